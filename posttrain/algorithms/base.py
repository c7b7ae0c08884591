"""What an algorithm contributes to the one training loop.

The loop (posttrain/train/loop.py) owns accumulation, global normalisation, clipping, precision,
sharding, every optimizer, logging, evaluation and checkpoints. An algorithm only says how to
build its models and data, how to make this process's micro-batches for an optimizer step, how
many loss units a batch holds, and how to compute the loss of one micro-batch. An algorithm that
trains a second model in the same loss (PPO's critic) registers it as an extra `Trainable`; the
loop gives it an optimizer and schedule and clips, skips, checkpoints and shards it like the
policy. It never subclasses a trainer.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from posttrain.config import OptimConfig
from posttrain.losses.types import LossOutput
from posttrain.models.loading import load_causal_lm, load_tokenizer


@dataclass
class Trainable:
    """A model the loop trains: its own AdamW (`optim`'s groups and schedule) and, after the
    loop prepares it, its prepared module, optimizer and scheduler."""

    name: str  # metrics prefix and final/ sub-directory ("model" is the policy)
    module: torch.nn.Module
    optim: OptimConfig
    optimizer: Any = None
    scheduler: Any = None


@dataclass(frozen=True)
class Provided:
    """Objects the Python API (posttrain/api.py) hands an algorithm in memory, used instead of
    loading them from the recipe's paths. In-memory data sets do not come this way: the API
    saves them next to the run and points data.train_path / data.eval_path at them, so they go
    through the same loader and checks as files."""

    model: Any = None
    """An already loaded transformers model, trained in place (None: load model.name_or_path)."""
    tokenizer: Any = None
    """An already loaded tokenizer (None: load it from model.name_or_path)."""
    reward_functions: Mapping[str, Callable] = field(default_factory=dict)
    """Reward callables by the name of the recipe's `rewards` entry they stand for."""


# Models handed in by the API: a reference policy is then a copy of the object (there may be no
# path to load it from, and the object may differ from what is on disk). Identity, not equality.
_PROVIDED_MODELS: weakref.WeakSet = weakref.WeakSet()


def is_provided_model(module: torch.nn.Module) -> bool:
    """Whether `module` is a model object the Python API handed in (not loaded from a path)."""
    return module in _PROVIDED_MODELS


class Algorithm(ABC):
    name: str = "algorithm"
    provided: Provided = Provided()  # the API sets an instance's own; the CLI provides nothing

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def load_tokenizer(self):
        """The provided tokenizer, or the one of model.name_or_path."""
        if self.provided.tokenizer is not None:
            return self.provided.tokenizer
        return load_tokenizer(self.cfg.model.name_or_path, self.cfg.model.trust_remote_code)

    def load_model(self, loader: Callable = load_causal_lm, *args) -> torch.nn.Module:
        """The provided model, or `loader(cfg.model, *args)` (load_causal_lm by default)."""
        if self.provided.model is not None:
            _PROVIDED_MODELS.add(self.provided.model)
            return self.provided.model
        return loader(self.cfg.model, *args)

    @abstractmethod
    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        """Load models, tokenizer and data; return the (unprepared) trainable model."""

    @abstractmethod
    def micro_batches(self, step: int, accelerator: Accelerator, model: torch.nn.Module) -> list:
        """This process's micro-batches for optimizer step `step` (0-based)."""

    @abstractmethod
    def num_units(self, batch) -> int:
        """Loss units in a batch (tokens, pairs, sequences): the loop divides by their global sum."""

    @abstractmethod
    def compute_loss(self, model: torch.nn.Module, batch) -> LossOutput:
        """Loss of one micro-batch as a sum over its units (see LossOutput)."""

    def extra_trainables(self) -> list[Trainable]:
        """Models other than the one `setup` returns that `compute_loss` trains (PPO's critic).
        The loop prepares them (replacing `.module` by the prepared one), owns their optimizer
        steps, and gives their MoE routers the same router losses and balancing."""
        return []

    def num_tokens(self, batch) -> int:
        """Non-pad tokens processed, for throughput."""
        return int(getattr(batch, "num_tokens", 0))

    def evaluate(self, model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        return {}

    def on_step_end(self, model: torch.nn.Module, step: int, accelerator: Accelerator) -> dict:
        """Hook after each optimizer step (e.g. refresh a reference policy); returns metrics."""
        return {}

    def pop_samples(self) -> list[dict]:
        """Sample completions (dicts of prompt, completion, rewards) this step produced for the
        samples table, handed over once; online RL only."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_final(
        self, model: torch.nn.Module, path: Path, state_dicts: dict[str, dict | None]
    ) -> None:
        """Write the trained model in Hugging Face format (main process only). `state_dicts`
        maps each Trainable's name to its full state dict gathered by every rank when the
        model is sharded, or None when the unwrapped module holds whole parameters."""
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dicts.get("model"))
        self.tokenizer.save_pretrained(path)


class OfflineAlgorithm(Algorithm):
    """An algorithm trained on a fixed data set (SFT, RM, DPO): a step's global batch comes from
    StepSampler, split into this process's micro-batches and collated by the algorithm."""

    train_examples: list

    @abstractmethod
    def collate(self, examples: list):
        """Turn examples into one typed batch."""

    def init_sampler(self, accelerator: Accelerator) -> None:
        train = self.cfg.train
        self.sampler = StepSampler(len(self.train_examples), train.seed)
        self.global_batch = train.batch_size * train.grad_accum * accelerator.num_processes

    def micro_batches(self, step: int, accelerator: Accelerator, model: torch.nn.Module) -> list:
        indices = self.sampler.global_batch(step, self.global_batch)
        micro = local_micro_indices(indices, self.cfg.train.batch_size, accelerator)
        return [self.collate([self.train_examples[i] for i in m]) for m in micro]

    def epoch_at(self, step: int) -> float:
        return self.sampler.epoch_of(step, self.global_batch)

    def eval_batches(self, examples: list, accelerator: Accelerator):
        """This process's share of held-out examples as (batch, weight) micro-batches.

        Every process yields the same number of batches: sharded models (FSDP2, ZeRO-3) run
        collectives inside each forward. A process with fewer rows pads with a copy of a real
        batch whose weight is 0.0: callers multiply its sums by the weight."""
        mine = examples[accelerator.process_index :: accelerator.num_processes]
        size = self.cfg.train.batch_size
        for start in process_batches(len(mine), size, accelerator):
            rows, weight = mine[start : start + size], 1.0
            if not rows:
                rows, weight = (mine or examples)[:size], 0.0
            yield self.collate(rows).to(accelerator.device), weight


class StepSampler:
    """Deterministic global batches: step k takes positions [k*G, (k+1)*G) of an endless stream
    made of per-epoch permutations seeded by (seed, epoch).

    The examples of a step depend only on the step number, so resuming needs no sampler state,
    and any split of the global batch into processes x micro-batches sees the same examples.
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("no training examples")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perms = {epoch: torch.randperm(self.num_examples, generator=g).tolist()}
            else:
                self._perms = {epoch: list(range(self.num_examples))}
        return self._perms[epoch]

    def global_batch(self, step: int, size: int) -> list[int]:
        out = []
        for pos in range(step * size, (step + 1) * size):
            epoch, offset = divmod(pos, self.num_examples)
            out.append(self._perm(epoch)[offset])
        return out

    def epoch_of(self, step: int, size: int) -> float:
        return step * size / self.num_examples


def local_micro_indices(
    global_indices: list[int], micro_batch: int, accelerator: Accelerator
) -> list[list[int]]:
    """Split a global batch into this process's micro-batches.

    Micro-batch m of process r holds slice [(m*world + r)*b, (m*world + r + 1)*b).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    n_micro = len(global_indices) // (micro_batch * world)
    return [
        global_indices[(m * world + rank) * micro_batch : (m * world + rank + 1) * micro_batch]
        for m in range(n_micro)
    ]


def process_batches(count: int, batch_size: int, accelerator: Accelerator) -> range:
    """Start offsets of `batch_size` chunks over this process's `count` rows, padded to the
    largest count of any process: FSDP2/ZeRO-3 forwards are collectives, so every rank must run
    the same number of them (the extra offsets point past the end: empty chunks)."""
    chunks = torch.tensor(float(-(-count // batch_size)), device=accelerator.device)
    if accelerator.num_processes > 1:
        chunks = accelerator.reduce(chunks, reduction="max")
    return range(0, int(chunks) * batch_size, batch_size)
