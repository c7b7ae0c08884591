"""RewardModelScorer on a tiny sequence-classification checkpoint made inside the test."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.scoring import RewardModelScorer, RewardSpec, Scorer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 1M-parameter model gains nothing from intra-op threads, and on a loaded 2-core machine
    their synchronisation costs ~50x (measured: 12 ms vs 0.2 ms per small matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = None  # the scorer must restore it from the tokenizer
    out = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(out)
    # The tokenizer travels with the checkpoint, as with any user reward model.
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scorer(reward_model_dir):
    return RewardModelScorer(reward_model_dir, batch_size=2)


PROMPTS = ["What is 2 + 3? ", "Add 10 and 20. ", "Hi. "]
COMPLETIONS = ["<answer>5</answer>", "The total is thirty, so <answer>30</answer>", "7"]


def test_scores_are_finite_deterministic_and_shaped(scorer):
    assert scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id
    first = scorer(PROMPTS, COMPLETIONS)
    second = scorer(PROMPTS, COMPLETIONS)
    assert len(first) == 3 and all(math.isfinite(s) for s in first)
    assert first == second
    assert len(set(first)) == 3  # different texts, different scores


def test_padding_does_not_change_a_score(scorer, monkeypatch):
    monkeypatch.setattr(scorer, "batch_size", 8)
    batched = scorer(PROMPTS, COMPLETIONS)  # one right-padded batch of 3
    alone = [scorer([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert batched == pytest.approx(alone, abs=1e-5)
    # The score is the head at the last real token of the unpadded text.
    ids = torch.tensor([scorer._encode(PROMPTS[1], COMPLETIONS[1])])
    with torch.no_grad():
        hidden = scorer.model.model(input_ids=ids).last_hidden_state  # (1, T, H)
        by_hand = scorer.model.score(hidden[0, -1]).item()
    assert batched[1] == pytest.approx(by_hand, abs=1e-5)


def test_chat_prompts_use_the_chat_template(scorer):
    chat = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}]]
    text = scorer.render(chat[0], "<answer>5</answer>")
    assert text.startswith("<|bos|><|user|>What is 2 + 3?<|end|><|assistant|><answer>5</answer>")
    scores = scorer(chat, ["<answer>5</answer>", "hello"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_long_texts_are_cut_on_the_left(scorer, monkeypatch):
    monkeypatch.setattr(scorer, "max_length", 16)
    ids = scorer._encode("word " * 100, " <answer>5</answer>")
    assert len(ids) == 16
    assert scorer.tokenizer.decode(ids).endswith("<answer>5</answer>")


def test_reward_model_inside_the_scorer(reward_model_dir, scorer):
    combined = Scorer(
        [RewardSpec("reward_model", params={"path": str(reward_model_dir)}), RewardSpec("accuracy")]
    )
    result = combined(PROMPTS, COMPLETIONS, answer=["5", "30", "8"])
    direct = scorer(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(result.per_function["reward_model"], torch.tensor(direct))
    torch.testing.assert_close(result.rewards, torch.tensor(direct) + torch.tensor([1.0, 1.0, 0.0]))
