"""The Python API: one trainer class per registered algorithm, over the entry the CLI uses.

    from posttrain import SFTTrainer
    result = SFTTrainer("recipes/sft_tiny.yaml", overrides=["train.max_steps=10"]).train()

A trainer takes a recipe (a YAML path, a dict of sections or a recipe object, plus dotted
`overrides`) and optionally objects a notebook already holds: in-memory `datasets.Dataset`s,
a loaded model and tokenizer, reward callables (online RL) and callbacks. `.train()` runs the
one loop (posttrain/train/loop.py) and returns its `TrainResult` (output_dir, final_dir, steps,
last_metrics, seconds). `posttrain sft RECIPE k=v` is `SFTTrainer(RECIPE, overrides=[k=v]).train()`.

Where each object enters:
- data sets are saved under `train.output_dir/api_data/` (datasets.save_to_disk) and
  data.train_path / data.eval_path point there, so rows go through the same loader, format
  detection and error messages as files, and the run's config.yaml names data that exists;
- model and tokenizer reach the algorithm as `Provided` (posttrain/algorithms/base.py): it
  trains the model object in place instead of loading model.name_or_path; a reference policy
  is a frozen copy of the object;
- reward callables stand for the recipe's `rewards` entries of the same name (see
  `_apply_rewards`); they are called with keywords, `fn(prompts=, completions=, **columns)`,
  so TRL-style `def reward(completions, **kwargs)` works unchanged;
- callbacks are called by the loop: `on_step_end(step, state)`, `on_log(step, metrics)`,
  `on_evaluate(step, metrics)`.

This module imports torch, transformers and datasets only when a trainer is built, so
`import posttrain` stays light (posttrain/__init__.py loads it on first use).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from posttrain.config import (
    ConfigError,
    apply_overrides,
    check_recipe,
    from_dict,
    to_dict,
)
from posttrain.config import (
    load_recipe as _load_yaml_recipe,
)
from posttrain.errors import UserError

# Recipe keys that only say how posttrain loads the model; with a model object they would do
# nothing, so a recipe that sets them is refused (set them on the object instead).
_LOADING_KEYS = {
    "model.dtype": "the object keeps its own dtype",
    "model.attn_implementation": "the object keeps its attention implementation",
    "model.lora.load_in_4bit": "quantize the object yourself",
    "model.moe.freeze_router": "set requires_grad=False on the object's router weights",
}


def _registry() -> dict:
    from posttrain.algorithms import ALGORITHMS  # torch and transformers: seconds

    return ALGORITHMS


def load_recipe(
    algorithm: str | type[Trainer],
    recipe: str | os.PathLike | Mapping | Any | None = None,
    overrides: Sequence[str] = (),
):
    """The typed, checked recipe of `algorithm` ("sft", "grpo", ... or a trainer class) from a
    YAML path, a dict of sections, a recipe object (copied, not changed) or None (defaults),
    with dotted `overrides` such as "optim.lr=3e-4" applied on top."""
    name = algorithm.algorithm if isinstance(algorithm, type) else algorithm
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"unknown algorithm {name!r}: expected one of {', '.join(registry)}")
    recipe_cls = registry[name][0]
    if recipe is None or isinstance(recipe, (str, os.PathLike)):
        return _load_yaml_recipe(recipe_cls, recipe, list(overrides))
    if isinstance(recipe, recipe_cls):
        data = to_dict(recipe)
    elif dataclasses.is_dataclass(recipe):
        raise ConfigError(
            f"{name}: expected a {recipe_cls.__name__}, got a {type(recipe).__name__}"
        )
    elif isinstance(recipe, Mapping):
        data = to_dict(from_dict(recipe_cls, dict(recipe)))  # checked, and a deep copy
    else:
        raise ConfigError(
            f"{name}: a recipe is a YAML path, a dict of sections or a {recipe_cls.__name__}, "
            f"got {type(recipe).__name__}"
        )
    cfg = from_dict(recipe_cls, apply_overrides(data, list(overrides)))
    check_recipe(cfg)
    return cfg


class Trainer:
    """Train one algorithm from Python; see the module docstring. Subclasses (SFTTrainer, ...)
    only set `algorithm`, the key of posttrain.algorithms.ALGORITHMS."""

    algorithm: str = ""

    def __init__(
        self,
        recipe: str | os.PathLike | Mapping | Any | None = None,
        *,
        overrides: Sequence[str] = (),
        train_dataset=None,
        eval_dataset=None,
        model=None,
        tokenizer=None,
        reward_funcs: Callable | Sequence[Callable] | Mapping[str, Callable] | None = None,
        callbacks: Sequence[Any] = (),
        on_log: Callable | None = None,
        on_step_end: Callable | None = None,
        on_evaluate: Callable | None = None,
    ):
        self.config = load_recipe(self.algorithm, recipe, overrides)
        self._source = f"{recipe}: " if isinstance(recipe, (str, os.PathLike)) else ""
        self._prepared = False
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.model = model
        self.tokenizer = tokenizer
        self.reward_funcs = _named_rewards(reward_funcs)
        if self.reward_funcs and _rewards_section(self.config) is None:
            raise ConfigError(f"{self.algorithm}: reward_funcs are for online RL (grpo, kimi, ppo)")
        functions = {"on_log": on_log, "on_step_end": on_step_end, "on_evaluate": on_evaluate}
        given = {k: v for k, v in functions.items() if v is not None}
        self.callbacks = [*callbacks, *([SimpleNamespace(**given)] if given else [])]
        self.result = None

    def prepare(self) -> None:
        """Resolve the run's config: in-memory data saved and pointed at, reward entries bound,
        required keys and the environment checked (preflight). `train` calls it once."""
        if self._prepared:
            return
        cfg = self.config
        if self.model is not None:
            _reject_loading_keys(cfg)
            if not cfg.model.name_or_path:  # where it came from, for records and the tokenizer
                cfg.model.name_or_path = str(getattr(self.model, "name_or_path", "") or "")
        elif not cfg.model.name_or_path:
            raise ConfigError(f"{self._source}model.name_or_path is required (or pass model=)")
        if self.tokenizer is None and not cfg.model.name_or_path:
            raise ConfigError(
                "the model object has no name_or_path to load a tokenizer from: pass tokenizer="
            )
        from posttrain.preflight import check_extras, check_output_dir, preflight

        if self.model is None:
            preflight(cfg)
        else:  # nothing on disk to size or inspect
            check_extras(cfg)
            check_output_dir(cfg.train.output_dir)
        out = Path(cfg.train.output_dir)
        if self.train_dataset is not None:
            cfg.data.train_path = _saved_dataset(self.train_dataset, out, "train")
        if self.eval_dataset is not None:
            cfg.data.eval_path = _saved_dataset(self.eval_dataset, out, "eval")
        if self.reward_funcs:
            _apply_rewards(cfg, self.reward_funcs)
        self._prepared = True

    def train(self):
        """Train and return the TrainResult (output_dir, final_dir, steps, last_metrics).
        Under torchrun / accelerate launch the process group stays up for the caller's own
        work; end the script with `torch.distributed.destroy_process_group()` (the CLI does),
        or gloo may abort the process while the interpreter shuts down."""
        from posttrain.algorithms.base import Provided
        from posttrain.train.loop import train

        self.prepare()
        algorithm = _registry()[self.algorithm][1](self.config)
        algorithm.provided = Provided(
            model=self.model,
            tokenizer=self.tokenizer,
            reward_functions={n: _keyword_call(f) for n, f in self.reward_funcs.items()},
        )
        self.result = train(self.config, algorithm, callbacks=self.callbacks)
        return self.result


def _reject_loading_keys(cfg) -> None:
    for key, instead in _LOADING_KEYS.items():
        *sections, name = key.split(".")
        node = cfg
        for part in sections:
            node = getattr(node, part)
        if getattr(node, name) != getattr(type(node)(), name):
            raise ConfigError(
                f"{key} applies when posttrain loads the model; a model object was passed "
                f"({instead}): remove {key}"
            )


def _saved_dataset(dataset, out: Path, split: str) -> str:
    """`dataset` written with save_to_disk under OUT/api_data (once per content: the name holds
    its fingerprint; a process that finds it already there keeps the first copy)."""
    import datasets

    if isinstance(dataset, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(dataset))
    if not isinstance(dataset, datasets.Dataset):
        kind = type(dataset).__name__
        hint = " (pick one split, e.g. ds['train'])" if isinstance(dataset, Mapping) else ""
        raise UserError(
            f"{split}_dataset: expected a datasets.Dataset or a list of dicts, got {kind}{hint}"
        )
    if len(dataset) == 0:
        raise UserError(f"{split}_dataset: no rows")
    fingerprint = getattr(dataset, "_fingerprint", None) or str(os.getpid())
    target = out / "api_data" / f"{split}-{fingerprint}"
    if not target.is_dir():
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar per save is noise next to the run's own
        try:
            dataset.save_to_disk(str(staging))
        finally:
            if bars:
                datasets.enable_progress_bars()
        try:
            os.rename(staging, target)
        except OSError:  # another process of the same launch renamed its copy first
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _named_rewards(funcs) -> dict[str, Callable]:
    if funcs is None:
        return {}
    if isinstance(funcs, Mapping):
        named = dict(funcs)
    else:
        funcs = [funcs] if callable(funcs) else list(funcs)
        named = {}
        for fn in funcs:
            name = getattr(fn, "__name__", "")
            if not name or name == "<lambda>":
                raise ConfigError("reward_funcs: a lambda has no name; pass {name: function}")
            if name in named:
                raise ConfigError(f"reward_funcs: two functions named {name!r}; pass a dict")
            named[name] = fn
    for name, fn in named.items():
        if not callable(fn):
            raise ConfigError(f"reward_funcs[{name!r}] is a {type(fn).__name__}, not callable")
    return named


def _rewards_section(cfg):
    """The online-RL section whose `rewards` shape the training signal (grpo, kimi, ppo), or
    None. (The `evaluation` section has `rewards` too, but those only measure.)"""
    from posttrain.algorithms.rl_common import OnlineRLSettings

    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, OnlineRLSettings):
            return section
    return None


def _apply_rewards(cfg, funcs: Mapping[str, Callable]) -> None:
    """Bind callables to the recipe's `rewards` entries by name. If the recipe names every one
    of them, each uses its entry's weight and the others stay as they are; if it names none,
    they replace the list with weight 1.0 each; naming only some is an error (which did you
    mean to keep?)."""
    from posttrain.algorithms.rl_common import RewardFunctionConfig

    section = _rewards_section(cfg)
    names = [entry.name for entry in section.rewards]
    missing = [name for name in funcs if name not in names]
    if not missing:
        return
    if len(missing) < len(funcs):
        raise ConfigError(
            f"reward_funcs {missing} are not among the recipe's rewards {names} while the "
            f"others are: name them all in the recipe, or none (then they replace it)"
        )
    section.rewards = [RewardFunctionConfig(name=name, weight=1.0) for name in funcs]


def _keyword_call(fn: Callable) -> Callable:
    """The Scorer calls fn(prompts, completions, **columns); TRL calls with keywords only, so
    functions written for it (`def reward(completions, **kwargs)`) need the keyword form."""

    @functools.wraps(fn)
    def reward(prompts, completions, **columns):
        return fn(prompts=prompts, completions=completions, **columns)

    return reward


# One class per algorithm, named as users coming from TRL expect; any other registered
# algorithm gets `<NAME>Trainer`. Generated from the registry keys, so nothing is copied.
CLASS_NAMES = {
    "sft": "SFTTrainer",
    "rm": "RewardTrainer",
    "dpo": "DPOTrainer",
    "kto": "KTOTrainer",
    "grpo": "GRPOTrainer",
    "kimi": "KimiTrainer",
    "ppo": "PPOTrainer",
}


def trainer_class(algorithm: str) -> type[Trainer]:
    """The trainer class of a registered algorithm (made once, cached)."""
    return _trainer_classes()[algorithm]


@functools.cache
def _trainer_classes() -> dict[str, type[Trainer]]:
    classes = {}
    for name in _registry():
        cls_name = CLASS_NAMES.get(name, f"{name.upper()}Trainer")
        doc = f"Train with `{name}` (recipe: posttrain config keys {name}). See posttrain.api."
        classes[name] = type(
            cls_name, (Trainer,), {"algorithm": name, "__doc__": doc, "__module__": __name__}
        )
    return classes


def __getattr__(name: str):
    """SFTTrainer, GRPOTrainer, ... made on first use (the registry imports torch)."""
    for algorithm, cls_name in CLASS_NAMES.items():
        if name == cls_name:
            return trainer_class(algorithm)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
