"""Built-in reward functions with hand-computed values, and resolve_reward (spec §7-§9)."""

from __future__ import annotations

import pytest

from posttrain.scoring.rewards import (
    BUILTIN_REWARDS,
    accuracy,
    code_output,
    digit_overlap,
    kimi_length,
    make_format_reward,
    make_kimi_length,
    make_overlong,
    overlong,
    resolve_reward,
)

FORMAT = BUILTIN_REWARDS["format"]


def test_accuracy():
    completions = ["<answer>579</answer>", "<answer>580</answer>", "it is 1,000", "no idea"]
    assert accuracy([""] * 4, completions, answer=[579, "579", "1000", "3"]) == [1.0, 0.0, 1.0, 0.0]


def test_accuracy_names_a_missing_column():
    with pytest.raises(KeyError, match="answer"):
        accuracy(["p"], ["c"], completion_lengths=[1])


def test_format_default_and_custom_pattern():
    completions = [
        "<think>a\nb</think>\n<answer>3</answer>",
        "  <think>x</think><answer>3</answer>\n",  # outer whitespace is fine
        "<answer>3</answer>",
        "<think>x</think><answer>3</answer> trailing text",
    ]
    assert FORMAT([""] * 4, completions) == [1.0, 1.0, 0.0, 0.0]
    answer_only = make_format_reward(r"<answer>\d+</answer>")
    assert answer_only([""] * 4, completions) == [0.0, 0.0, 1.0, 0.0]


def test_kimi_length_worked_example():
    # Group 1 (G=4): lengths 10..40 so min=10, max=40 and
    #   λ = 0.5 - (len-10)/30 = [0.5, 1/6, -1/6, -0.5]; correct [T, F, T, F]
    #   -> correct keeps λ, wrong gets min(0, λ): [0.5, 0.0, -1/6, -0.5].
    # Group 2: all lengths equal -> no length signal -> zeros.
    completions = ["<answer>5</answer>", "<answer>6</answer>"] * 2 + ["<answer>5</answer>"] * 4
    columns = dict(answer=["5"] * 8, completion_lengths=[10, 20, 30, 40, 7, 7, 7, 7])
    expected = [0.5, 0.0, -1 / 6, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert kimi_length([""] * 8, completions, group_size=4, **columns) == pytest.approx(expected)
    assert make_kimi_length(4)([""] * 8, completions, **columns) == pytest.approx(expected)
    by_ids = kimi_length([""] * 8, completions, group_ids=[0, 0, 0, 0, 1, 1, 1, 1], **columns)
    assert by_ids == pytest.approx(expected)
    as_column = kimi_length([""] * 8, completions, group_size=[4] * 8, **columns)
    assert as_column == pytest.approx(expected)


def test_kimi_length_needs_groups_that_fit():
    with pytest.raises(ValueError, match="groups of 3"):
        kimi_length([""] * 4, ["a"] * 4, group_size=3, answer=["1"] * 4, completion_lengths=[1] * 4)
    with pytest.raises(ValueError, match="group_size"):
        kimi_length([""] * 4, ["a"] * 4, answer=["1"] * 4, completion_lengths=[1] * 4)


def test_overlong_soft_penalty():
    # max_length=20, cache_length=4: safe up to 16, then (16 - L)/4, then -1 past 20.
    lengths = [10, 16, 17, 18, 20, 25]
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    reward = make_overlong(max_length=20, cache_length=4)
    assert reward([""] * 6, [""] * 6, completion_lengths=lengths) == pytest.approx(expected)
    direct = overlong([""] * 6, [""] * 6, completion_lengths=lengths, max_length=20, cache_length=4)
    assert direct == pytest.approx(expected)
    with pytest.raises(ValueError, match="cache_length"):
        make_overlong(max_length=4, cache_length=8)


def test_digit_overlap():
    completions = [
        "<answer>579</answer>",
        "<answer>597</answer>",
        "<answer>57</answer>",
        "none",
        "it is 10",
    ]
    answers = ["579", "579", "579", "579", "100"]
    # multiset overlap: 3/3, 3/3 (order ignored), 2/3, no answer, {1,0} of {1,0,0} = 2/3
    assert digit_overlap([""] * 5, completions, answer=answers) == pytest.approx(
        [1, 1, 2 / 3, 0, 2 / 3]
    )
    assert digit_overlap(
        [""] * 2, ["<answer>Paris</answer>", "<answer>Rome</answer>"], answer=["paris"] * 2
    ) == [1.0, 0.0]


def test_code_output_runs_the_last_python_block():
    completions = [
        "Here:\n```python\nprint(2 + 3)\n```",
        "```python\nprint(1)\n```\nbetter:\n```python\nprint(sum(range(4)) - 1)\n```",
        "```python\nprint(6)\n```",
        "no code, just 5",
        "```python\nraise SystemExit(1)\n```",
    ]
    scores = code_output([""] * 5, completions, expected_output=["5", "5", "5", "5", ""])
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_registry_holds_every_builtin():
    assert set(BUILTIN_REWARDS) == {
        "accuracy",
        "format",
        "kimi_length",
        "overlong",
        "digit_overlap",
        "code_output",
    }
    assert all(callable(fn) for fn in BUILTIN_REWARDS.values())


def test_resolve_builtins_and_factories():
    assert resolve_reward("accuracy") is accuracy
    assert resolve_reward("format")([""], ["<think>a</think><answer>1</answer>"]) == [1.0]
    custom = resolve_reward("format", pattern=r"ok")
    assert custom([""] * 2, ["ok", "no"]) == [1.0, 0.0]
    penalty = resolve_reward("overlong", max_length=20, cache_length=4)
    assert penalty([""], [""], completion_lengths=[18]) == [-0.5]
    with pytest.raises(ValueError, match="overlong"):
        resolve_reward("overlong")  # needs max_length and cache_length
    with pytest.raises(ValueError, match="accuracy.*no parameters"):
        resolve_reward("accuracy", weight=2)
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        resolve_reward("acuracy")


def test_resolve_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shortness(prompts, completions, **kwargs):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
        "def make_bonus(value):\n"
        "    return lambda prompts, completions, **kwargs: [value] * len(completions)\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards:shortness")(["p", "p"], ["", "abc"]) == [1.0, 0.25]
    assert resolve_reward("my_rewards:make_bonus", value=0.5)(["p"], ["x"]) == [0.5]
    with pytest.raises(ValueError, match="'no_such_module:f'.*cannot import"):
        resolve_reward("no_such_module:f")
    with pytest.raises(ValueError, match="'my_rewards:missing'.*no attribute"):
        resolve_reward("my_rewards:missing")
    with pytest.raises(ValueError, match="'my_rewards:NOT_CALLABLE'.*not a callable"):
        resolve_reward("my_rewards:NOT_CALLABLE")
