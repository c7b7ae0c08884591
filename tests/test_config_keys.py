"""Every recipe key of every algorithm is read by the run it configures.

Each algorithm's recipe is wrapped so that reading a config field records its dotted key, then
a one-step run goes through the real loop (setup, micro-batches, loss, evaluation, final save).
A key that no code reads is a key a user can set to no effect; it must instead be rejected
with a ConfigError or be listed below as read only under another setting, with the reason.
Reads by dataclasses (asdict when saving config.yaml, replace) do not count.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
from cli_helpers import REPO

from posttrain.algorithms import ALGORITHMS
from posttrain.config import load_recipe
from posttrain.train.loop import train

# Keys read only when another setting turns their feature on (the default runs here leave it
# off), with the setting that does.
CONDITIONAL = {
    "model.lora.": "model.lora.r > 0",
    "model.mtp.": "model.mtp.kind != none (sft)",
    "model.moe.": "a mixture-of-experts model",
    "model.gradient_checkpointing": "read by the loop only when true",
    "train.resume": "read by the CLI (--resume) before the loop",
    "train.num_threads": "CPU only, read when > 0",
    "optim.decay_embeddings": "read only when optim.weight_decay > 0",
    "train.hub_": "read only when train.push_to_hub (checked before training, used after it)",
    "evaluation.rewards": "read only when evaluation.metric is not default",
    "evaluation.match": "read only when evaluation.metric is not default",
    "evaluation.max_new_tokens": "read only when evaluation.metric is not default",
    "evaluation.samples": "read only when evaluation.metric is not default",
    "evaluation.success_threshold": "read only when evaluation.metric is not default",
    "logging.project": "read only when logging.report_to names a tracker",
    "logging.run_name": "read only when logging.report_to names a tracker",
    "logging.samples_": "online RL only (grpo, kimi, ppo: the samples table)",
}
PER_ALGORITHM = {
    "sft": {
        "data.format": "read per row only when it is not auto",
    },
    "rm": {},
    "dpo": {
        "dpo.label_smoothing": "read only by loss_types cdpo and robust",
        "dpo.gamma": "read only by loss_type simpo",
        "dpo.reference": "read only without precompute and with LoRA off when empty",
    },
    "grpo": {
        "grpo.reference": "read only when grpo.beta > 0",
        "dapo.max_refill_rounds": "read only when dapo.dynamic_sampling",
        "grpo.epsilon_low": "read by the loss (the default recipe's loss_type)",
    },
    "kimi": {},
    "kto": {},
    "ppo": {
        "ppo.target_kl": "read only when ppo.kl_control is adaptive",
        "ppo.kl_horizon": "read only when ppo.kl_control is adaptive",
    },
}
DATA = {"rm": "preference", "dpo": "preference", "sft": "sft", "kto": "kto"}


class _Recorder:
    reads: set[str] = set()


def _recording_getattr(self, name):
    value = object.__getattribute__(self, name)
    fields = object.__getattribute__(self, "__dataclass_fields__")
    if name in fields:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller not in ("dataclasses", "copy"):
            path = object.__getattribute__(self, "__dict__").get("_path")
            if path is not None:
                _Recorder.reads.add(f"{path}{name}")
    return value


def recording(obj, path: str = ""):
    """A copy of the dataclass tree `obj` whose field reads are recorded as dotted keys."""
    cls = type(obj)
    sub = type(cls.__name__, (cls,), {"__getattribute__": _recording_getattr})
    copy = object.__new__(sub)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = recording(value, f"{path}{f.name}.")
        copy.__dict__[f.name] = value
    copy.__dict__["_path"] = path
    return copy


def leaf_keys(obj, path: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            keys += leaf_keys(value, f"{path}{f.name}.")
        else:
            keys.append(f"{path}{f.name}")
    return keys


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_config_key_is_read(name, tiny_model_dir, arithmetic_dir, tmp_path):
    recipe_cls, algorithm_cls = ALGORITHMS[name]
    recipe = {"kimi": "kimi_tiny.yaml"}.get(name, f"{name}_tiny.yaml")
    data = DATA.get(name, "rl")
    values = {
        "model.name_or_path": tiny_model_dir,
        "data.train_path": arithmetic_dir / f"{data}_train.jsonl",
        "data.eval_path": arithmetic_dir / f"{data}_test.jsonl",
        "data.max_eval_examples": 8,
        "train.output_dir": tmp_path / name,
        "train.max_steps": 1,
        "train.batch_size": 8,
        "train.save_every": 1,
        "logging.log_every": 1,
        "logging.progress": False,
    }
    section = {"grpo": "grpo", "kimi": "kimi"}.get(name)
    if section:
        values.update({f"{section}.prompts_per_step": 2, f"{section}.num_generations": 4})
        values.update({f"{section}.max_new_tokens": 4})
    if name == "ppo":
        values.update({"ppo.prompts_per_rollout": 8, "ppo.max_new_tokens": 4})
    cfg = load_recipe(
        recipe_cls, REPO / "recipes" / recipe, [f"{k}={v}" for k, v in values.items()]
    )
    _Recorder.reads = set()
    recorded = recording(cfg)
    train(recorded, algorithm_cls(recorded))
    allowed = {**CONDITIONAL, **PER_ALGORITHM[name]}
    unread = [
        key
        for key in leaf_keys(cfg)
        if key not in _Recorder.reads and not any(key.startswith(a) for a in allowed)
    ]
    assert not unread, f"{name}: keys no code reads: {unread}"
