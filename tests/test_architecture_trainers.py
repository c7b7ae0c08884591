"""Every trainer, a few steps, on every family of the architecture matrix, through the CLI as a
user runs it (slow: ~70 runs). The numerical equalities are in test_architectures.py; this
checks that each trainer starts, trains to finite losses and saves a loadable `final/` on each
family, with the fast paths on (where they apply) and their start-up notices where they don't.
"""

from __future__ import annotations

import json
import math

import pytest
from arch_models import FAMILIES, attn_of, build_family
from cli_helpers import run_cli

TRAINERS = {
    "sft": ("recipes/sft_tiny_packed.yaml", "sft_train.jsonl", {}),
    "dpo": ("recipes/dpo_tiny.yaml", "preference_train.jsonl", {"data.packing": "true"}),
    "rm": ("recipes/rm_tiny.yaml", "preference_train.jsonl", {"data.packing": "true"}),
    "grpo": ("recipes/grpo_tiny.yaml", "rl_train.jsonl", {"grpo.prompts_per_step": 2}),
    "ppo": ("recipes/ppo_tiny.yaml", "rl_train.jsonl", {"ppo.prompts_per_rollout": 4}),
}


# transformers has no AutoModelForTokenClassification class for these: PPO says so (exit 2)
NO_CRITIC = {"gemma3-window", "olmo2", "opt"}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from posttrain.models.tokenizer import build_tokenizer

    tokenizer, root, cache = build_tokenizer(vocab_size=512), tmp_path_factory.mktemp("fam"), {}

    def get(family):
        if family not in cache:
            cache[family] = build_family(family, root / family, tokenizer)
        return cache[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("trainer", list(TRAINERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_runs_on_family(family_dir, arithmetic_dir, tmp_path, family, trainer):
    path = family_dir(family)
    recipe, data, extra = TRAINERS[trainer]
    out = tmp_path / "run"
    overrides = {
        "model.name_or_path": path,
        "model.attn_implementation": attn_of(path),
        "data.train_path": arithmetic_dir / data,
        "data.eval_path": "",
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "logging.progress": "false",
        "logging.log_every": 1,
        **extra,
    }
    r = run_cli(trainer, recipe, *(f"{k}={v}" for k, v in overrides.items()))
    if trainer == "ppo" and family in NO_CRITIC:
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "use grpo (no critic) for this family" in r.stderr
        return
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(rec["loss"]) for rec in records if "loss" in rec)
    assert (out / "final" / "config.json").is_file()
