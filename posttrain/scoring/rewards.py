"""Built-in reward functions (spec §7 DAPO overlong penalty, §8 Kimi length penalty, §9
verifiable rewards) and the registry that turns a name from a recipe into a callable.

Every reward is a plain callable, as in TRL:

    fn(prompts: list, completions: list[str], **columns) -> list[float]

`columns` holds the data set's other columns aligned with the samples (e.g. `answer=[...]`)
plus `completion_lengths` (token counts) and `truncated`, which the Scorer always passes.
Functions take **kwargs so they ignore the columns they do not need. A factory parameter of a
built-in (`group_size`, `max_length`, ...) can also arrive as a column of the same name.

`resolve_reward(name, **params)` accepts a built-in name or a `module:function` path.
"""

from __future__ import annotations

import importlib
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from posttrain.errors import UserError
from posttrain.losses.grpo import overlong_penalty
from posttrain.losses.kimi import kimi_length_penalty
from posttrain.scoring.answers import answers_match, extract_answer, is_correct
from posttrain.scoring.sandbox import code_output, make_code_output

RewardFn = Callable[..., list[float]]

DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)  # tensors, arrays, lists


def _column(columns: dict, name: str, reward: str) -> list:
    if name not in columns or columns[name] is None:
        raise KeyError(f"reward {reward!r} needs a column {name!r}; got columns {sorted(columns)}")
    return _as_list(columns[name])


def _scalar(value, name: str, reward: str):
    """A factory parameter that may arrive as a column: a scalar, or a list of equal values."""
    if value is None:
        raise ValueError(f"reward {reward!r} needs {name!r} (as a parameter or a column)")
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(set(value)) != 1:
            raise ValueError(
                f"reward {reward!r}: column {name!r} must hold one value, got {set(value)}"
            )
        return value[0]
    return value


def accuracy(prompts: list, completions: list[str], **columns) -> list[float]:
    """1.0 when the extracted final answer equals column `answer` (spec §9), else 0.0."""
    answers = _column(columns, "answer", "accuracy")
    return [float(is_correct(c, a)) for c, a in zip(completions, answers, strict=True)]


def make_format_reward(pattern: str = DEFAULT_FORMAT_PATTERN) -> RewardFn:
    """1.0 when the whole completion (outer whitespace aside) matches `pattern` (DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def format_reward(prompts: list, completions: list[str], **columns) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    format_reward.__name__ = "format"
    return format_reward


format = make_format_reward()  # shadows the builtin inside this module only; unused here


def kimi_length(
    prompts: list, completions: list[str], group_size=None, group_ids=None, **columns
) -> list[float]:
    """Kimi k1.5 length penalty within each group of consecutive samples of one prompt (spec §8):

        λ_j = 0.5 - (len_j - min_len) / (max_len - min_len)
        reward_j = λ_j if y_j is correct else min(0, λ_j)      (0 when all lengths are equal)

    Groups come from `group_size` (G consecutive samples per prompt) or, failing that, from runs
    of equal `group_ids`. Lengths are `completion_lengths`; correctness is the accuracy reward's.
    """
    lengths = _column(columns, "completion_lengths", "kimi_length")
    answers = _column(columns, "answer", "kimi_length")
    n = len(completions)
    if group_size is not None:
        size = int(_scalar(group_size, "group_size", "kimi_length"))
        if size <= 0 or n % size:
            raise ValueError(f"kimi_length: {n} samples do not split into groups of {size}")
        bounds = [(start, start + size) for start in range(0, n, size)]
    elif group_ids is not None:
        ids = _as_list(group_ids)
        starts = [i for i in range(n) if i == 0 or ids[i] != ids[i - 1]]
        bounds = list(zip(starts, [*starts[1:], n], strict=True))
    else:
        raise ValueError("reward 'kimi_length' needs group_size (parameter or column) or group_ids")
    correct = torch.tensor([is_correct(c, a) for c, a in zip(completions, answers, strict=True)])
    lengths = torch.tensor(lengths, dtype=torch.float32)
    rewards = torch.zeros(n)
    for start, end in bounds:  # the penalty itself is losses/kimi.py's, one group at a time
        rewards[start:end] = kimi_length_penalty(
            lengths[start:end], correct[start:end], end - start
        )
    return rewards.tolist()


def make_kimi_length(group_size: int | None = None) -> RewardFn:
    """`kimi_length` with a fixed group size (None: read `group_size`/`group_ids` from columns)."""
    if group_size is None:
        return kimi_length

    def kimi_length_fixed(prompts: list, completions: list[str], **columns) -> list[float]:
        columns.pop("group_size", None)
        return kimi_length(prompts, completions, group_size=group_size, **columns)

    kimi_length_fixed.__name__ = "kimi_length"
    return kimi_length_fixed


def _overlong_limits(max_length, cache_length) -> tuple[int, int]:
    max_length, cache_length = int(max_length), int(cache_length)
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"overlong: need 0 < cache_length <= max_length, got {cache_length}, {max_length}"
        )
    return max_length, cache_length


def overlong(
    prompts: list, completions: list[str], max_length=None, cache_length=None, **columns
) -> list[float]:
    """DAPO soft overlong penalty (spec §7) on `completion_lengths` L, with L_max = max_length
    and L_cache = cache_length: 0 if L <= L_max - L_cache; (L_max - L_cache - L) / L_cache while
    L is inside the buffer; -1 beyond L_max."""
    max_length, cache_length = _overlong_limits(
        _scalar(max_length, "max_length", "overlong"),
        _scalar(cache_length, "cache_length", "overlong"),
    )
    lengths = torch.tensor(_column(columns, "completion_lengths", "overlong"), dtype=torch.float32)
    return overlong_penalty(lengths, max_length, cache_length).tolist()  # losses/grpo.py's rule


def make_overlong(max_length: int, cache_length: int) -> RewardFn:
    """`overlong` with fixed L_max and L_cache (DAPO uses 20480 and 4096)."""
    max_length, cache_length = _overlong_limits(max_length, cache_length)

    def overlong_fixed(prompts: list, completions: list[str], **columns) -> list[float]:
        columns.pop("max_length", None)
        columns.pop("cache_length", None)
        return overlong(
            prompts, completions, max_length=max_length, cache_length=cache_length, **columns
        )

    overlong_fixed.__name__ = "overlong"
    return overlong_fixed


def digit_overlap(prompts: list, completions: list[str], **columns) -> list[float]:
    """Fraction of the reference answer's digits (as a multiset) found in the extracted answer.

    A dense, partial-credit reward with spread inside a group (used by benchmarks, where a tiny
    model's exact accuracy is all zeros). References without digits score 1.0 on a match."""
    rewards = []
    for completion, reference in zip(
        completions, _column(columns, "answer", "digit_overlap"), strict=True
    ):
        predicted = extract_answer(completion)
        wanted = Counter(ch for ch in str(reference) if ch.isdigit())
        if predicted is None:
            rewards.append(0.0)
        elif not wanted:
            rewards.append(float(answers_match(predicted, str(reference))))
        else:
            found = wanted & Counter(ch for ch in predicted if ch.isdigit())
            rewards.append(sum(found.values()) / sum(wanted.values()))
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format,
    "kimi_length": kimi_length,
    "overlong": overlong,
    "digit_overlap": digit_overlap,
    "code_output": code_output,
}


def _reward_model(**params) -> RewardFn:
    from posttrain.scoring.reward_model import RewardModelScorer  # imports transformers lazily

    return RewardModelScorer(**params)


# Built-ins whose parameters go to a factory; "reward_model" exists only through its factory.
REWARD_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "format": make_format_reward,
    "kimi_length": make_kimi_length,
    "overlong": make_overlong,
    "code_output": make_code_output,
    "reward_model": _reward_model,
}


class RewardError(UserError, ValueError):
    """A reward named in a recipe that cannot be built: unknown name, import failure, bad params."""


def _import_reward(path: str) -> RewardFn:
    """`module:function`, the module found on sys.path (the CLI adds the working directory)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise RewardError(f"reward {path!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # missing module, or user code failing at import (SyntaxError...)
        raise RewardError(
            f"reward {path!r}: cannot import module {module_name!r} "
            f"({type(error).__name__}: {error}; searched the working directory {os.getcwd()} "
            "and the installed packages)"
        ) from error
    fn = getattr(module, attribute, None)
    if fn is None:
        raise RewardError(
            f"reward {path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
            f"has no attribute {attribute!r}"
        )
    if not callable(fn):
        raise RewardError(
            f"reward {path!r}: {attribute!r} is a {type(fn).__name__}, not a callable"
        )
    return fn


def resolve_reward(name: str, **params) -> RewardFn:
    """A reward function from a built-in name or a `module:function` path.

    Params go to the built-in's factory (`make_format_reward`, `make_kimi_length`,
    `make_overlong`, `make_code_output`, `RewardModelScorer` for "reward_model"). A
    `module:function` with params calls `function(**params)` as a factory."""
    if ":" in name:
        fn = _import_reward(name)
        if not params:
            return fn
        try:
            return fn(**params)
        except TypeError as error:
            raise RewardError(
                f"reward {name!r}: bad parameters {sorted(params)} ({error})"
            ) from error
    if name in REWARD_FACTORIES:  # no params: the default (overlong, reward_model need some)
        try:
            return REWARD_FACTORIES[name](**params)
        except (TypeError, ValueError, re.error) as error:
            if isinstance(error, UserError):
                raise
            raise RewardError(
                f"reward {name!r}: bad parameters {sorted(params)} ({error})"
            ) from error
    if name in BUILTIN_REWARDS:
        if params:
            raise RewardError(f"reward {name!r} takes no parameters, got {sorted(params)}")
        return BUILTIN_REWARDS[name]
    known = sorted({*BUILTIN_REWARDS, *REWARD_FACTORIES})
    raise RewardError(f"unknown reward {name!r}: expected one of {known} or 'module:function'")
