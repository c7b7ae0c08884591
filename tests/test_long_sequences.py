"""Long sequences: 4,096-token SFT examples with gradient checkpointing give the gradients of
the plain backward, packed rows give the padded loss on a sliding-window model (windows of 16
tokens, so every layer type matters at this length), and truncation keeps the configured end."""

from __future__ import annotations

import pytest
import torch
from arch_models import attn_of, build_family

from posttrain.algorithms.sft import collate_sft
from posttrain.config import ModelConfig
from posttrain.data.encoding import EncodedExample, encode_sft_examples
from posttrain.losses.sft import cross_entropy_loss
from posttrain.models import attention_support
from posttrain.models.loading import load_causal_lm

LONG = 4096


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    from posttrain.models.tokenizer import build_tokenizer

    return build_family("gemma3-window", tmp_path_factory.mktemp("long") / "g3", build_tokenizer())


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (LONG, 300, 57):
        ids = torch.randint(10, 200, (n,), generator=g).tolist()
        out.append(EncodedExample(ids, [0] * 20 + [1] * (n - 20)))
    return out


def _loss_and_grads(model, batch):
    model.zero_grad()
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    out = cross_entropy_loss(logits, batch.labels)
    (out.total / out.units).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.total.detach(), grads


@pytest.mark.slow
def test_4096_tokens_packed_with_gradient_checkpointing_equals_padded_plain(gemma3_dir):
    cfg = ModelConfig(name_or_path=str(gemma3_dir), attn_implementation=attn_of(gemma3_dir))
    model = load_causal_lm(cfg).train()
    prof = attention_support.profile(model)
    mode, _ = attention_support.sft_packing(prof)
    examples = _examples()
    padded = collate_sft(examples, 0, LONG, "padded", prof)
    want_loss, want_grads = _loss_and_grads(model, padded)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = collate_sft(examples, 0, 2 * LONG, mode, prof)
    assert packed.input_ids.shape == (1, LONG + 300 + 57)
    got_loss, got_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def test_truncation_side(tiny_model_dir):
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    row = {"text": " ".join(str(i) for i in range(100))}
    right = encode_sft_examples(tok, row, "text", 16, "row 1")[0]
    left = encode_sft_examples(tok, row, "text", 16, "row 1", side="left")[0]
    full = encode_sft_examples(tok, row, "text", 10_000, "row 1")[0]
    assert right.truncated and left.truncated and not full.truncated
    assert right.input_ids == full.input_ids[:16] and left.input_ids == full.input_ids[-16:]
