"""Prefix-shared packed preference batches give the padded batch's log-probs and scores."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.algorithms.dpo import completion_logps
from posttrain.algorithms.reward_model import packed_scores
from posttrain.data.preference import encode_preference_file, preference_collate
from posttrain.data.preference_packing import packed_preference_collate
from posttrain.models.loading import load_tokenizer

ROWS = [
    # answers that share a first token, one answer a prefix of the other, long and short prompts
    {"prompt": "What is 41 + 44?", "chosen": "85", "rejected": "86"},
    {"prompt": "1 + 9 =", "chosen": "10", "rejected": "1"},
    {
        "prompt": "a long preamble about nothing much at all, then 12 + 30",
        "chosen": "42",
        "rejected": "a wrong and much longer answer",
    },
    {"prompt": "3+3", "chosen": "6", "rejected": "7"},
    {"prompt": "tell me 55 + 17 please", "chosen": "72 is the sum", "rejected": "62"},
]


def _examples(tiny_model_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    tok = load_tokenizer(str(tiny_model_dir))
    return tok, encode_preference_file(tok, str(path), max_length=64).examples


@pytest.mark.parametrize("source", ["strings", "chat messages"])
def test_packed_logps_equal_padded_and_share_the_prompt(
    tiny_model_dir, arithmetic_dir, tmp_path, source
):
    tok, examples = _examples(tiny_model_dir, tmp_path)
    if source == "chat messages":
        path = str(arithmetic_dir / "preference_test.jsonl")
        examples = encode_preference_file(tok, path, max_length=64, limit=12).examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    padded = preference_collate(examples, tok.pad_token_id)
    # A short row length forces several rows; a long one puts every pair in one row.
    for row_length in (16, 512):
        packed = packed_preference_collate(examples, tok.pad_token_id, row_length)
        assert packed.num_tokens == padded.num_tokens  # the same tokens are scored
        assert packed.computed_tokens < padded.num_tokens  # but prompts are computed once
        with torch.no_grad():
            want, want_len = completion_logps(model, padded)
            got, got_len = completion_logps(model, packed)
        torch.testing.assert_close(got_len, want_len)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_packed_gradients_equal_padded(tiny_model_dir, tmp_path):
    tok, examples = _examples(tiny_model_dir, tmp_path)
    grads = []
    for batch in (
        preference_collate(examples, tok.pad_token_id),
        packed_preference_collate(examples, tok.pad_token_id, 64),
    ):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        logps, _ = completion_logps(model, batch)
        (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_packed_rm_scores_equal_padded(tiny_model_dir, tmp_path):
    tok, examples = _examples(tiny_model_dir, tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tok.pad_token_id
    )
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a fresh head scores ~0 everywhere
    padded = preference_collate(examples, tok.pad_token_id)
    packed = packed_preference_collate(examples, tok.pad_token_id, 32)
    with torch.no_grad():
        want = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
        got = packed_scores(model, packed)
    torch.testing.assert_close(got, want.squeeze(-1), atol=2e-5, rtol=1e-5)


def test_packing_with_eager_attention_gets_an_additive_mask(tiny_model_dir, tmp_path):
    """Eager attention adds the mask to the scores: a boolean mask would be added as 0/1, so
    the model is given 0 / -inf and the packed log-probs still equal the padded ones."""
    from posttrain.data.preference_packing import forward_mask

    tok, examples = _examples(tiny_model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    packed = packed_preference_collate(examples, tok.pad_token_id, 64)
    assert forward_mask(model, packed).dtype == torch.float32
    with torch.no_grad():
        want, _ = completion_logps(model, preference_collate(examples, tok.pad_token_id))
        got, _ = completion_logps(model, packed)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
