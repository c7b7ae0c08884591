"""The prompt-shared decode attention honours the attention kwargs it is given: soft-capping
(Gemma 2) is applied to both score parts; a sliding window or attention sinks, which it cannot
reproduce, are refused rather than ignored (the engine routes such models elsewhere)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.rollout.prefix_shared import _ACTIVE, SharedPrompt, prefix_shared_attention


def _setup(softcap_scale=3.0):
    torch.manual_seed(0)
    B, n, H, P, T, D = 2, 3, 2, 5, 4, 8
    layer = SimpleNamespace(
        keys=torch.randn(B, H, P, D) * softcap_scale, values=torch.randn(B, H, P, D)
    )
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # a left-padded prompt
    shared = SharedPrompt(SimpleNamespace(layers=[layer]), prompt_mask, n)
    query = torch.randn(B * n, H, 1, D) * softcap_scale
    key, value = torch.randn(B * n, H, T, D), torch.randn(B * n, H, T, D)
    return shared, layer, prompt_mask, query, key, value


def _reference(layer, prompt_mask, query, key, value, n, softcap):
    """Softmax over [the row's prompt keys ; its own keys], soft-capped, one row at a time."""
    out = []
    for row in range(query.shape[0]):
        g = row // n
        keep = prompt_mask[g].bool()
        k = torch.cat([layer.keys[g][:, keep], key[row]], dim=1)  # (H, P' + T, D)
        v = torch.cat([layer.values[g][:, keep], value[row]], dim=1)
        scores = (query[row] @ k.transpose(-1, -2)) * query.shape[-1] ** -0.5  # (H, 1, K)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        out.append((scores.softmax(-1) @ v).transpose(0, 1))  # (1, H, D)
    return torch.stack(out)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_soft_capping_matches_the_eager_reference(softcap):
    shared, layer, prompt_mask, query, key, value = _setup()
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=1)
    token = _ACTIVE.set(shared)
    try:
        got, _ = prefix_shared_attention(module, query, key, value, None, softcap=softcap)
    finally:
        _ACTIVE.reset(token)
    want = _reference(layer, prompt_mask, query, key, value, shared.n, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if softcap is not None:  # the cap really changes the numbers at this scale
        uncapped = _reference(layer, prompt_mask, query, key, value, shared.n, None)
        assert (uncapped - want).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs", [{"sliding_window": 16}, {"s_aux": torch.zeros(2)}])
def test_windows_and_sinks_are_refused(kwargs):
    shared, _, _, query, key, value = _setup()
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=1)
    token = _ACTIVE.set(shared)
    try:
        with pytest.raises(RuntimeError, match="cannot apply sliding windows or attention sinks"):
            prefix_shared_attention(module, query, key, value, None, **kwargs)
    finally:
        _ACTIVE.reset(token)
