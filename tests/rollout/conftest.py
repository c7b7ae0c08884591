"""Fixtures for the rollout tests: one tiny random Llama checkpoint per session, loaded back
through from_pretrained (a fresh model per test, since some tests change its EOS ids)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def rollout_model_dir(tmp_path_factory) -> Path:
    from posttrain.models.presets import init_model

    return init_model(tmp_path_factory.mktemp("rollout") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tokenizer(rollout_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(rollout_model_dir)


@pytest.fixture
def model(rollout_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(rollout_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def prompts() -> list:
    """Prompts of different lengths in all three accepted forms."""
    return [
        [{"role": "user", "content": "What is 12 + 30?"}],
        [
            {"role": "system", "content": "Answer with a number and think step by step first."},
            {"role": "user", "content": "Please compute the total of 45 and 17, then check it."},
        ],
        "Short text",
        [1, 20, 30, 40, 50, 60, 70],
    ]


@pytest.fixture(autouse=True)
def single_thread():
    """The tiny model is too small to gain from intra-op threads, and on a busy 2-core machine
    OpenMP spin-waiting makes 2 threads many times slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def extra_eos():
    """Make ordinary tokens end generation too (for the engine and HF `generate` alike), so a
    random model finishes rows at different steps. `many=True` picks 40 random ids: a
    near-uniform model then hits one in ~8% of steps and sampled rows end at mixed lengths."""

    def apply(model, tokenizer, ids: list[int] | None = None, many: bool = False) -> list[int]:
        if many:
            generator = torch.Generator().manual_seed(0)
            ids = torch.randperm(len(tokenizer) - 10, generator=generator)[:40].add(10).tolist()
        eos_ids = [tokenizer.eos_token_id, *ids]
        model.generation_config.eos_token_id = eos_ids
        return eos_ids

    return apply
