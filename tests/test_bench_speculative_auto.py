"""`speculative="auto"`: speculates below the break-even rows per chunk, decodes plainly at or
above it (one notice), and in both cases emits exactly plain greedy decoding's tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import MTPConfig
from posttrain.models.mtp import MTPHeads
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.rollout.speculative import DEFAULT_BREAK_EVEN_ROWS, use_speculation

PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    "Short text",
    [1, 20, 30, 40, 50, 60, 70],
]


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def heads_for(model) -> MTPHeads:
    torch.manual_seed(0)
    heads = MTPHeads(model.config, MTPConfig(kind="medusa", depth=3))
    for layer in heads.medusa:  # untrained drafts: often wrong, so rejection paths run too
        torch.nn.init.normal_(layer.weight, std=0.3)
    return heads.eval()


def test_auto_decision():
    assert use_speculation("auto", 3, 32, True) == (True, "")
    speculate, reason = use_speculation("auto", 32, 32, True)
    assert not speculate and "32 rows per chunk >= the break-even of 32" in reason
    assert use_speculation("auto", 1, 32, False)[0] is False
    assert "no MTP heads" in use_speculation("auto", 1, 32, False)[1]
    assert use_speculation("none", 1, 32, True) == (False, "")
    assert use_speculation("mtp", 10_000, 32, True) == (True, "")  # explicit mtp is obeyed
    assert 1 < DEFAULT_BREAK_EVEN_ROWS <= 64


@pytest.mark.parametrize("n, speculates", [(1, True), (3, False)])
def test_auto_tokens_equal_plain_decoding(model_and_tokenizer, capsys, n, speculates):
    # break-even 4 rows: 3 prompts x 1 sample speculate, 3 x 3 = 9 rows decode plainly
    model, tokenizer = model_and_tokenizer
    engine = RolloutEngine(model, tokenizer, mtp_heads=heads_for(model), speculative_break_even=4)
    common = dict(temperature=0.0, max_new_tokens=17, n=n)
    plain = engine.generate(PROMPTS, SamplingParams(**common))
    capsys.readouterr()
    auto = engine.generate(PROMPTS, SamplingParams(**common, speculative="auto"))
    assert engine.last_stats["speculative_chunks"] == (1 if speculates else 0)
    assert auto.completion_ids.tolist() == plain.completion_ids.tolist()
    assert auto.completion_mask.tolist() == plain.completion_mask.tolist()
    torch.testing.assert_close(auto.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    notice = capsys.readouterr().out
    assert ("decodes plainly" in notice) is (not speculates)
    engine.generate(PROMPTS, SamplingParams(**common, speculative="auto"))
    assert "decodes plainly" not in capsys.readouterr().out  # one notice per engine


def test_auto_without_heads_decodes_plainly(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    engine = RolloutEngine(model, tokenizer)
    params = dict(temperature=0.0, max_new_tokens=9)
    plain = engine.generate(PROMPTS, SamplingParams(**params))
    auto = engine.generate(PROMPTS, SamplingParams(**params, speculative="auto"))
    assert auto.completion_ids.tolist() == plain.completion_ids.tolist()
    assert "no MTP heads" in capsys.readouterr().out
    with pytest.raises(ValueError, match="none, mtp or auto"):
        SamplingParams(speculative="sometimes")


def test_calibrate_break_even_returns_a_measured_batch(model_and_tokenizer):
    from posttrain.rollout.speculative import calibrate_break_even

    model, tokenizer = model_and_tokenizer
    engine = RolloutEngine(model, tokenizer, mtp_heads=heads_for(model))
    found = calibrate_break_even(engine, PROMPTS, max_new_tokens=4, batches=(1, 2))
    assert found in (1, 2, 4)  # a measured batch, or twice the largest when it always wins
