"""The one scoring engine: weighted reward functions that never stop training (spec §9).

`Scorer(specs)` resolves each `RewardSpec` (a built-in name or `module:function`, see
rewards.py), calls every function on the whole batch and returns

    rewards[i] = Σ_k weight_k · r_k[i]        (N,) float32

with each function's scores and metrics. Failure handling (spec §9):
- a function that raises: every sample it scores gets `failure_reward`; the exception is
  logged once per failed call, with the function's name (the traceback the first time);
- a function that runs past `timeout_s` (default 60 s per call in the recipes): the same, for
  that call, counted separately as `rewards/NAME/timeouts`;
- a score that is None, NaN, ±inf or not a number: that sample alone gets `failure_reward`;
- returning a different number of scores than samples is a programming error, not a flaky
  verifier, so it raises `ScoringError` naming the function and both counts.
A sample's failures are counted per function in the metrics.

Timeout limitation: Python cannot kill a thread. A timed call runs in a daemon thread that is
abandoned when the timeout passes; it keeps running in the background (using CPU and possibly
holding the GIL) until it returns by itself, and its result is ignored. While a function has
MAX_ABANDONED such calls still running, its next calls count as timeouts at once instead of
starting yet another thread (a function that hangs every time would otherwise pile them up).
Rewards that run untrusted or unbounded work should run it in a subprocess (see sandbox.py),
which can be killed.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.errors import UserError
from posttrain.scoring.rewards import resolve_reward

logger = logging.getLogger(__name__)


class ScoringError(UserError, RuntimeError):
    """A reward function broke its contract (e.g. returned the wrong number of scores)."""


class _Failed(Exception):
    """Internal: a call that raised or timed out; all its samples fail."""


class _TimedOut(_Failed):
    """Internal: a call still running after timeout_s (abandoned)."""


MAX_ABANDONED = 4
"""Timed-out calls of one function that may still run in the background (see above)."""


@dataclass
class RewardSpec:
    """One weighted reward function of a recipe."""

    name: str
    """Built-in name (`accuracy`, `format`, ...) or `module:function`; also the metric label."""
    weight: float = 1.0
    """Multiplier in the weighted sum; 0 keeps the function for its metrics only."""
    params: dict = field(default_factory=dict)
    """Keyword arguments for the built-in's factory (or the user function used as a factory)."""
    function: Callable | None = None
    """An already built reward function to use instead of resolving `name` (tests, notebooks)."""


@dataclass
class ScoreResult:
    """Scores of one batch of N samples."""

    rewards: torch.Tensor  # (N,) float32, weighted sum over functions
    per_function: dict[str, torch.Tensor]  # name -> (N,) float32, failures hold failure_reward
    metrics: dict[str, float]
    failures: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) bool

    def combine(self, weights: dict[str, float]) -> torch.Tensor:
        """The weighted sum with other weights (e.g. a Kimi length penalty warming up from 0)."""
        total = torch.zeros_like(self.rewards)
        for name, weight in weights.items():
            total += weight * self.per_function[name]
        return total


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and population std (defined for N = 1; 0 for an empty batch)."""
    if values.numel() == 0:
        return 0.0, 0.0
    return values.mean().item(), values.std(correction=0).item()


def _call_with_timeout(
    fn: Callable, timeout_s: float | None, args: tuple, kwargs: dict, abandoned: list
):
    """fn(*args, **kwargs), raising _Failed when it raises and _TimedOut when it outlives
    timeout_s. `abandoned` holds this function's timed-out threads (pruned here)."""
    if timeout_s is None:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise _Failed(error) from error
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as error:  # reported to the caller, not lost in the thread
            box["error"] = error

    abandoned[:] = [t for t in abandoned if t.is_alive()]
    if len(abandoned) >= MAX_ABANDONED:
        raise _TimedOut(TimeoutError(f"{len(abandoned)} earlier timed-out calls are still running"))
    worker = threading.Thread(target=target, name="posttrain-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():  # abandoned; see the module docstring
        abandoned.append(worker)
        raise _TimedOut(TimeoutError(f"no result after {timeout_s} s"))
    if "error" in box:
        raise _Failed(box["error"]) from box["error"]
    return box["value"]


def _as_list(values) -> list:
    """Plain Python values from a list, tuple, tensor or array (rewards compare and sum them)."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _as_float(value) -> float | None:
    """A finite float, or None for a score that counts as a failure."""
    if value is None or isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class Scorer:
    """Weighted sum of reward functions over a batch, robust to failing functions (spec §9)."""

    def __init__(
        self, specs: list[RewardSpec], failure_reward: float = 0.0, timeout_s: float | None = None
    ):
        names = [spec.name for spec in specs]
        if not specs:
            raise ValueError("Scorer needs at least one reward function")
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (they label the metrics), got {names}")
        self.specs = list(specs)
        self.failure_reward = float(failure_reward)
        self.timeout_s = timeout_s
        self.functions = {
            spec.name: spec.function
            if spec.function is not None
            else resolve_reward(spec.name, **spec.params)
            for spec in specs
        }
        self._logged_traceback: set[str] = set()
        self._abandoned: dict[str, list[threading.Thread]] = {name: [] for name in names}

    def _score_one(self, name: str, prompts: list, completions: list[str], columns: dict):
        """(scores (N,), failed (N,) bool, timed out) of one function; ScoringError on a wrong
        count."""
        n = len(completions)
        try:
            raw = _call_with_timeout(
                self.functions[name],
                self.timeout_s,
                (prompts, completions),
                columns,
                self._abandoned[name],
            )
        except _Failed as failure:
            error = failure.__cause__ or failure.args[0]
            timed_out = isinstance(failure, _TimedOut)
            first = name not in self._logged_traceback and not timed_out
            self._logged_traceback.add(name)
            logger.warning(
                "reward function %r failed on a batch of %d samples, which get failure_reward=%s: %r",
                name,
                n,
                self.failure_reward,
                error,
                exc_info=error if first else None,
            )
            failed = torch.ones(n, dtype=torch.bool)
            return torch.full((n,), self.failure_reward), failed, timed_out
        if isinstance(raw, torch.Tensor):
            raw = raw.reshape(-1).tolist()
        if raw is None or isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
            raise ScoringError(
                f"reward function {name!r} returned {type(raw).__name__}, expected a list of {n} floats"
            )
        if len(raw) != n:
            raise ScoringError(
                f"reward function {name!r} returned {len(raw)} scores for {n} samples (expected {n})"
            )
        values = [_as_float(v) for v in raw]
        failed = torch.tensor([v is None for v in values], dtype=torch.bool)
        scores = torch.tensor(
            [self.failure_reward if v is None else v for v in values], dtype=torch.float32
        )
        if failed.any():
            logger.warning(
                "reward function %r gave no finite score for %d of %d samples",
                name,
                int(failed.sum()),
                n,
            )
        return scores, failed, False

    def __call__(
        self,
        prompts: list,
        completions: list[str],
        completion_lengths: list[int] | None = None,
        truncated: list[bool] | None = None,
        **columns,
    ) -> ScoreResult:
        """Score N samples. `columns` are the data set's other columns, aligned with the samples.

        `completion_lengths` (token counts) and `truncated` always reach the functions; callers
        should pass them, and without them the lengths are counted in characters and no
        completion is truncated."""
        n = len(completions)
        if len(prompts) != n:
            raise ScoringError(f"{len(prompts)} prompts for {n} completions")
        if completion_lengths is None:
            completion_lengths = [len(c) for c in completions]
        columns["completion_lengths"] = _as_list(completion_lengths)
        columns["truncated"] = _as_list(truncated) if truncated is not None else [False] * n
        rewards = torch.zeros(n, dtype=torch.float32)
        per_function, failures, metrics = {}, {}, {}
        timeouts = 0
        for spec in self.specs:
            scores, failed, timed_out = self._score_one(
                spec.name, list(prompts), list(completions), dict(columns)
            )
            per_function[spec.name], failures[spec.name] = scores, failed
            rewards += spec.weight * scores
            mean, std = _mean_std(scores)
            metrics[f"rewards/{spec.name}/mean"] = mean
            metrics[f"rewards/{spec.name}/std"] = std
            metrics[f"rewards/{spec.name}/failures"] = float(failed.sum())
            metrics[f"rewards/{spec.name}/timeouts"] = float(n if timed_out else 0)
            timeouts += n if timed_out else 0
        metrics["rewards/mean"], metrics["rewards/std"] = _mean_std(rewards)
        metrics["scoring/failures"] = float(sum(f.sum().item() for f in failures.values()))
        metrics["scoring/timeouts"] = float(timeouts)
        return ScoreResult(
            rewards=rewards, per_function=per_function, failures=failures, metrics=metrics
        )
