"""The Scorer: weighted sums, metrics, and failures that are counted but never stop training
(spec §9)."""

from __future__ import annotations

import logging
import math
import threading

import pytest
import torch

from posttrain.scoring import RewardSpec, Scorer, ScoringError

PROMPTS = ["What is 2+3?"] * 4
COMPLETIONS = [
    "<think>easy</think><answer>5</answer>",  # right, formatted
    "<answer>5</answer>",  # right, unformatted
    "<think>hmm</think><answer>6</answer>",  # wrong, formatted
    "boom 6",  # wrong, unformatted
]
COLUMNS = dict(answer=["5"] * 4, completion_lengths=[10, 4, 10, 2], truncated=[False] * 4)


def explodes_on_boom(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        raise RuntimeError("verifier crashed on boom")
    return [1.0] * len(completions)


def nan_for_the_third(prompts, completions, **kwargs):
    return [0.5, 0.25, math.nan, None][: len(completions) - 1] + [1.0]


def test_weights_combine():
    scorer = Scorer([RewardSpec("accuracy", weight=2.0), RewardSpec("format", weight=0.5)])
    result = scorer(PROMPTS, COMPLETIONS, **COLUMNS)
    # accuracy [1, 1, 0, 0], format [1, 0, 1, 0] -> 2*acc + 0.5*fmt
    torch.testing.assert_close(result.rewards, torch.tensor([2.5, 2.0, 0.5, 0.0]))
    assert result.rewards.dtype == torch.float32 and result.rewards.shape == (4,)
    torch.testing.assert_close(result.per_function["accuracy"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(result.per_function["format"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(
        result.combine({"accuracy": 1.0}), torch.tensor([1.0, 1.0, 0.0, 0.0])
    )
    m = result.metrics
    assert m["rewards/accuracy/mean"] == pytest.approx(0.5)
    assert m["rewards/accuracy/std"] == pytest.approx(0.5)  # population std
    assert m["rewards/format/failures"] == 0.0
    assert m["rewards/mean"] == pytest.approx(1.25)
    assert m["rewards/std"] == pytest.approx(
        torch.tensor([2.5, 2.0, 0.5, 0.0]).std(correction=0).item()
    )
    assert m["scoring/failures"] == 0.0


def test_params_reach_the_factory_and_lengths_reach_the_function():
    scorer = Scorer([RewardSpec("overlong", params={"max_length": 10, "cache_length": 4})])
    lengths = torch.tensor([10, 4, 10, 2])  # a tensor, as the rollout engine holds them
    result = scorer(PROMPTS, COMPLETIONS, completion_lengths=lengths, answer=COLUMNS["answer"])
    # safe up to 6: lengths [10, 4, 10, 2] -> [-1, 0, -1, 0]
    torch.testing.assert_close(result.rewards, torch.tensor([-1.0, 0.0, -1.0, 0.0]))


def test_a_raising_function_fails_its_samples_and_is_logged_once(caplog):
    scorer = Scorer(
        [RewardSpec("fragile", function=explodes_on_boom), RewardSpec("accuracy")],
        failure_reward=-1.0,
    )
    with caplog.at_level(logging.WARNING, logger="posttrain.scoring.scorer"):
        result = scorer(PROMPTS, COMPLETIONS, **COLUMNS)
    torch.testing.assert_close(result.per_function["fragile"], torch.full((4,), -1.0))
    torch.testing.assert_close(result.rewards, torch.tensor([0.0, 0.0, -1.0, -1.0]))
    assert result.failures["fragile"].all()
    assert result.metrics["rewards/fragile/failures"] == 4.0
    assert result.metrics["scoring/failures"] == 4.0
    messages = [r.getMessage() for r in caplog.records if "fragile" in r.getMessage()]
    assert len(messages) == 1 and "verifier crashed on boom" in messages[0]
    # Without the poisoned sample the same function scores normally.
    clean = scorer(PROMPTS[:3], COMPLETIONS[:3], answer=["5"] * 3)
    torch.testing.assert_close(clean.per_function["fragile"], torch.ones(3))
    assert clean.metrics["scoring/failures"] == 0.0


def test_non_finite_scores_fail_only_their_samples():
    scorer = Scorer([RewardSpec("flaky", function=nan_for_the_third)], failure_reward=-2.0)
    result = scorer(PROMPTS, COMPLETIONS, **COLUMNS)  # [0.5, 0.25, nan, 1.0]
    torch.testing.assert_close(result.rewards, torch.tensor([0.5, 0.25, -2.0, 1.0]))
    assert result.failures["flaky"].tolist() == [False, False, True, False]
    assert result.metrics["rewards/flaky/failures"] == 1.0

    def none_and_inf(prompts, completions, **kwargs):
        return [None, math.inf, "x", 1]

    result = Scorer([RewardSpec("bad", function=none_and_inf)])(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(result.rewards, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert result.metrics["scoring/failures"] == 3.0


def test_a_timed_out_function_fails_its_samples():
    release = threading.Event()

    def hangs(prompts, completions, **kwargs):
        release.wait(timeout=30)  # stands in for a verifier that never returns
        return [1.0] * len(completions)

    scorer = Scorer(
        [RewardSpec("slow", function=hangs), RewardSpec("accuracy")],
        failure_reward=-0.5,
        timeout_s=0.2,
    )
    try:
        result = scorer(PROMPTS, COMPLETIONS, **COLUMNS)
    finally:
        release.set()  # let the abandoned thread finish
    torch.testing.assert_close(result.per_function["slow"], torch.full((4,), -0.5))
    torch.testing.assert_close(result.per_function["accuracy"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert result.metrics["rewards/slow/failures"] == 4.0


def test_timeout_path_still_returns_results_and_catches_errors():
    scorer = Scorer(
        [RewardSpec("accuracy"), RewardSpec("fragile", function=explodes_on_boom)], timeout_s=10
    )
    result = scorer(PROMPTS, COMPLETIONS, **COLUMNS)
    torch.testing.assert_close(result.per_function["accuracy"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert result.metrics["rewards/fragile/failures"] == 4.0


def test_wrong_count_is_a_scoring_error():
    def one_short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(ScoringError, match=r"'one_short' returned 3 scores for 4 samples"):
        Scorer([RewardSpec("one_short", function=one_short)])(PROMPTS, COMPLETIONS)
    with pytest.raises(ScoringError, match=r"'scalar' returned float"):
        Scorer([RewardSpec("scalar", function=lambda p, c, **k: 1.0)])(PROMPTS, COMPLETIONS)


def test_scorer_always_passes_lengths_and_truncation():
    seen = {}

    def record(prompts, completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    Scorer([RewardSpec("record", function=record)])(["p", "p"], ["ab", "abcd"], answer=["1", "2"])
    assert seen == {"answer": ["1", "2"], "completion_lengths": [2, 4], "truncated": [False, False]}


def test_bad_specs_fail_at_construction():
    with pytest.raises(ValueError, match="unique"):
        Scorer([RewardSpec("accuracy"), RewardSpec("accuracy", weight=2)])
    with pytest.raises(ValueError, match="unknown reward"):
        Scorer([RewardSpec("no_such_reward")])
