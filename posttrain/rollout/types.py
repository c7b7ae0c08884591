"""Typed inputs and outputs of the rollout engine: `SamplingParams` and `RolloutBatch`.

Every online trainer (GRPO, PPO, Kimi) and `posttrain eval` read samples through these two
types, so their shapes and masks are documented here once.

Layout of a `RolloutBatch`: N = num_prompts * n rows, grouped contiguously, so rows
[g*n : (g+1)*n] are the n samples of prompt g and `group_ids[r] == r // n`. Prompts are
LEFT-padded (the last prompt column is the last prompt token of every row, where generation
starts); completions are RIGHT-padded (column 0 is the first generated token of every row).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to sample completions; the defaults are plain ancestral sampling at temperature 1."""

    n: int = 1
    """Samples per prompt (the group size of GRPO)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns the filter off."""
    max_new_tokens: int = 64
    """Most tokens generated per sample, EOS included."""
    stop: list[str] = field(default_factory=list)
    """Stop strings besides EOS; a sample ends at the token that completes one of them."""
    seed: int | None = None
    """Seed of the sampling random numbers; None draws one from torch's global RNG. Unused when
    `RolloutEngine.generate` gets per-prompt seeds."""
    speculative: Literal["none", "mtp", "auto"] = "none"
    """Self-speculative decoding with the engine's MTP heads: the same tokens when greedy, the
    same distribution when sampling, fewer forwards of the main model (rollout/speculative.py).
    "auto" speculates only on chunks with fewer rows than the engine's break-even, where it is
    faster, and decodes plainly (one notice) above it or without heads."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if isinstance(self.stop, str):
            raise TypeError("SamplingParams.stop is a list of strings, not a string")
        if self.speculative not in ("none", "mtp", "auto"):
            raise ValueError(
                f"SamplingParams.speculative must be none, mtp or auto, got {self.speculative!r}"
            )
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain empty strings")


@dataclass(frozen=True)
class RolloutBatch:
    """Sampled completions with everything an RL loss needs. N rows, prompt width P, completion
    width C (the longest completion in the batch, at most max_new_tokens)."""

    prompt_ids: Tensor  # (N, P) long, LEFT-padded with the pad id
    prompt_mask: Tensor  # (N, P) long, 1 on real prompt tokens
    completion_ids: Tensor  # (N, C) long, RIGHT-padded with the pad id; includes EOS when produced
    completion_mask: (
        Tensor  # (N, C) long, 1 on generated tokens (EOS / stop-string tokens included)
    )
    logprobs: Tensor  # (N, C) float32, log softmax(logits / T) of each sampled token (T=1 if greedy); 0 on padding
    truncated: Tensor  # (N,) bool, hit max_new_tokens without EOS or a stop string
    group_ids: Tensor  # (N,) long, index of the prompt each row was sampled from
    texts: list[
        str
    ]  # N decoded completions, special tokens skipped, ending at the stop string if any
    # (N, C) long, 1 on tokens an environment appended in a multi-turn rollout (they are in
    # completion_mask, attended to, but carry no loss); None for single-turn rollouts
    env_mask: Tensor | None = None

    @property
    def sampled_mask(self) -> Tensor:
        """(N, C) 1 on the tokens the policy sampled: the loss mask of a multi-turn rollout
        (completion_mask itself when there is no environment)."""
        if self.env_mask is None:
            return self.completion_mask
        return self.completion_mask * (1 - self.env_mask)

    @property
    def lengths(self) -> Tensor:
        """(N,) number of generated tokens per row."""
        return self.completion_mask.sum(dim=-1)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def select(self, rows: Tensor) -> RolloutBatch:
        """The subset `rows` (indices or a bool mask over N), in that order; group ids keep their
        original prompt indices, so the result may no longer have n rows per group."""
        rows = torch.as_tensor(rows, device=self.completion_ids.device)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        picked = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **picked, texts=[self.texts[i] for i in rows.tolist()])

    @staticmethod
    def concat(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Rows of all `parts` in order, padded to the widest prompt (left) and completion
        (right); group ids are kept as they are."""
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("RolloutBatch.concat needs at least one non-empty batch")
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        completion_width = max(p.completion_ids.shape[1] for p in parts)

        def left(x: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(x, (prompt_width - x.shape[1], 0), value=value)

        def right(x: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(x, (0, completion_width - x.shape[1]), value=value)

        return RolloutBatch(
            prompt_ids=torch.cat([left(p.prompt_ids, pad_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
            completion_ids=torch.cat([right(p.completion_ids, pad_id) for p in parts]),
            completion_mask=torch.cat([right(p.completion_mask, 0) for p in parts]),
            logprobs=torch.cat([right(p.logprobs, 0.0) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            group_ids=torch.cat([p.group_ids for p in parts]),
            texts=[t for p in parts for t in p.texts],
            env_mask=None
            if all(p.env_mask is None for p in parts)
            else torch.cat(
                [
                    right(
                        p.env_mask
                        if p.env_mask is not None
                        else torch.zeros_like(p.completion_mask),
                        0,
                    )
                    for p in parts
                ]
            ),
        )

    def split(self, size: int) -> list[RolloutBatch]:
        """Consecutive minibatches of at most `size` rows."""
        return [
            self.select(torch.arange(s, min(s + size, len(self))))
            for s in range(0, len(self), size)
        ]
