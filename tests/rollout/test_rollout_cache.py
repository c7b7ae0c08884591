"""PreallocatedLayer behaves exactly like transformers' DynamicLayer."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from posttrain.rollout.cache import PreallocatedLayer, preallocated_cache


def kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(
        batch, 2, length, 3, generator=g
    )


def test_matches_dynamic_layer_through_repeat_select_and_growth():
    reference, layer = DynamicLayer(), PreallocatedLayer(capacity=6)  # overrun on purpose
    operations = [
        ("update", kv(2, 5, 0)),
        ("repeat", 3),
        ("update", kv(6, 1, 1)),
        ("select", torch.tensor([0, 2, 3, 5])),
        ("update", kv(4, 1, 2)),
        ("update", kv(4, 2, 3)),  # past the capacity: the buffer grows
    ]
    for op, arg in operations:
        if op == "update":
            expected, got = reference.update(*arg), layer.update(*arg)
            for e, g in zip(expected, got, strict=True):
                assert torch.equal(e, g)
        elif op == "repeat":
            reference.batch_repeat_interleave(arg)
            layer.batch_repeat_interleave(arg)
        else:
            reference.batch_select_indices(arg)
            layer.batch_select_indices(arg)
        assert layer.get_seq_length() == reference.get_seq_length()
        assert layer.get_mask_sizes(1) == reference.get_mask_sizes(1)
    assert layer.get_seq_length() == 9


def test_preallocated_cache_model_forward_matches_dynamic_cache(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    outputs = []
    for cache in (DynamicCache(config=model.config), preallocated_cache(model.config, 8)):
        with torch.no_grad():
            first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            cache.batch_repeat_interleave(2)
            nxt = model(input_ids=torch.tensor([[1], [2], [3], [4]]), past_key_values=cache).logits
        outputs.append((first, nxt))
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
