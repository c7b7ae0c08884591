"""Scoring: the one engine that turns completions into rewards (spec §7-§9).

- answers.py: final-answer extraction and tolerant comparison (verifiable rewards, §9);
- rewards.py: built-in reward functions (accuracy, format, Kimi length penalty §8, DAPO overlong
  penalty §7, digit overlap, code output) and `resolve_reward` for names and `module:function`;
- reward_model.py: a learnt sequence-classification reward model as a reward function;
- sandbox.py: resource-limited subprocesses for code-executing rewards;
- scorer.py: `Scorer`, the weighted sum of reward functions that never stops training.

`RewardModelScorer` is imported lazily so that rule-based scoring does not load transformers.
"""

from posttrain.scoring.answers import answers_match, extract_answer, normalize_answer, parse_number
from posttrain.scoring.rewards import (
    BUILTIN_REWARDS,
    REWARD_FACTORIES,
    RewardFn,
    accuracy,
    code_output,
    digit_overlap,
    kimi_length,
    make_code_output,
    make_format_reward,
    make_kimi_length,
    make_overlong,
    overlong,
    resolve_reward,
)
from posttrain.scoring.sandbox import run_in_subprocess
from posttrain.scoring.scorer import RewardSpec, Scorer, ScoreResult, ScoringError

format_reward = BUILTIN_REWARDS["format"]  # `format` itself would shadow the builtin here


def __getattr__(name: str):
    if name == "RewardModelScorer":
        from posttrain.scoring.reward_model import RewardModelScorer

        return RewardModelScorer
    raise AttributeError(f"module 'posttrain.scoring' has no attribute {name!r}")


__all__ = [
    "BUILTIN_REWARDS",
    "REWARD_FACTORIES",
    "RewardFn",
    "RewardModelScorer",
    "RewardSpec",
    "ScoreResult",
    "Scorer",
    "ScoringError",
    "accuracy",
    "answers_match",
    "code_output",
    "digit_overlap",
    "extract_answer",
    "format_reward",
    "kimi_length",
    "make_code_output",
    "make_format_reward",
    "make_kimi_length",
    "make_overlong",
    "normalize_answer",
    "overlong",
    "parse_number",
    "resolve_reward",
    "run_in_subprocess",
]
