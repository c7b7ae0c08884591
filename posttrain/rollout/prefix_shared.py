"""Decode attention that reads each prompt's keys and values once per group of n samples.

After the prefill, the n samples of a prompt share its keys/values. Expanding the cache n-fold
(`batch_repeat_interleave`) makes every decoding step read n copies of the prompt, and on CPU
that read is what decode attention costs: 5.2 ms per layer-step for 64 rows x 140 cached tokens
of the small preset against 0.8 ms when the prompt is read once per group (cascade attention).

So the prompt's keys/values stay in the prefill cache, one row per prompt, and the decode cache
holds only the generated tokens of each sample. The attention of a sample's new token is split
in two: over its prompt (computed for the whole group at once, one matmul per prompt) and over
its own generated tokens; the two softmax parts are merged with their log-sum-exp, which gives
the softmax over the concatenation exactly. The model runs this through transformers'
attention interface (registered under `NAME`) while `SharedPrompt.active` is in effect.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from transformers import AttentionInterface

NAME = "posttrain_prefix_shared"
_ACTIVE: ContextVar[SharedPrompt | None] = ContextVar("posttrain_shared_prompt", default=None)


class SharedPrompt:
    """Per-layer prompt keys/values (B, H_kv, P, D), the prompts' key mask (B, P), and for
    every live sample row its prompt (`group`) and its index among that prompt's n samples."""

    def __init__(self, prefill_cache, prompt_mask: Tensor, n: int):
        width = prompt_mask.shape[1]
        self.keys = [layer.keys[:, :, :width] for layer in prefill_cache.layers]
        self.values = [layer.values[:, :, :width] for layer in prefill_cache.layers]
        self.key_mask = prompt_mask.bool()  # (B, P)
        self.n = n
        rows = torch.arange(prompt_mask.shape[0] * n, device=prompt_mask.device)
        self.group, self.slot = rows // n, rows % n  # (R,), (R,)

    def select(self, keep: Tensor) -> None:
        """Keep the rows `keep` (as the decode cache's `batch_select_indices`)."""
        self.group, self.slot = self.group[keep], self.slot[keep]

    @contextmanager
    def active(self, model):
        """Route the model's attention through `prefix_shared_attention` for this block."""
        config = model.config
        previous = config._attn_implementation
        token = _ACTIVE.set(self)
        config._attn_implementation = NAME
        try:
            yield
        finally:
            config._attn_implementation = previous
            _ACTIVE.reset(token)


def supports_shared_prompt(model, prefill_cache) -> bool:
    """Models whose attention this function reproduces (attention_support.shared_decode: sdpa,
    no sliding windows, no sinks) and whose every cache layer is plain full attention."""
    from posttrain.models.attention_support import profile, shared_decode
    from posttrain.rollout.cache import PreallocatedLayer

    return shared_decode(profile(model)) is None and all(
        type(layer) is PreallocatedLayer for layer in prefill_cache.layers
    )


def _expand_heads(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def prefix_shared_attention(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask,
    scaling=None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """query (A, H, 1, D) of the live rows; key/value (A, H_kv, T, D): their generated tokens.
    Returns (A, 1, H, D) as transformers' sdpa_attention_forward does.

    Soft-capping (Gemma 2) is applied to both score parts. A sliding window or attention sinks
    (`s_aux`) would change which keys count; the engine does not route such models here
    (attention_support.shared_decode), and they are refused rather than silently ignored."""
    shared = _ACTIVE.get()
    if shared is None or query.shape[2] != 1:
        raise RuntimeError(f"{NAME} attention runs only inside SharedPrompt.active, one token/row")
    if sliding_window is not None or kwargs.get("s_aux") is not None:
        raise RuntimeError(f"{NAME} attention cannot apply sliding windows or attention sinks")

    def capped(scores: Tensor) -> Tensor:
        return scores if softcap is None else softcap * torch.tanh(scores / softcap)

    groups = getattr(module, "num_key_value_groups", 1)
    prompt_k = _expand_heads(shared.keys[module.layer_idx], groups)  # (B, H, P, D)
    prompt_v = _expand_heads(shared.values[module.layer_idx], groups)
    key, value = _expand_heads(key, groups), _expand_heads(value, groups)
    rows, heads, _, dim = query.shape
    prompts, n = shared.key_mask.shape[0], shared.n
    scale = scaling if scaling is not None else dim**-0.5

    # Prompt part, one matmul per prompt for all its samples: queries into (B, H, n, D) slots.
    slots = query.new_zeros(prompts, n, heads, dim)
    slots[shared.group, shared.slot] = query[:, :, 0]
    scores = capped((slots.transpose(1, 2) @ prompt_k.transpose(-1, -2)).float() * scale)
    scores = scores.masked_fill(~shared.key_mask[:, None, None, :], float("-inf"))
    prompt_max = scores.amax(-1, keepdim=True)  # (B, H, n, 1)
    weights = (scores - prompt_max).exp()
    prompt_sum = weights.sum(-1, keepdim=True)
    prompt_out = weights.to(prompt_v.dtype) @ prompt_v  # (B, H, n, D), unnormalised

    def live(x: Tensor) -> Tensor:  # (B, H, n, k) -> (A, H, k) for the live rows
        return x.transpose(1, 2)[shared.group, shared.slot]

    prompt_max, prompt_sum, prompt_out = live(prompt_max), live(prompt_sum), live(prompt_out)

    # Own part: the row's generated tokens (all of them precede the query).
    own = capped((query @ key.transpose(-1, -2)).float()[:, :, 0] * scale)  # (A, H, T)
    own_max = own.amax(-1, keepdim=True)
    own_weights = (own - own_max).exp()
    own_sum = own_weights.sum(-1, keepdim=True)
    own_out = (own_weights.to(value.dtype).unsqueeze(2) @ value)[:, :, 0]  # (A, H, D)

    # Merge the two softmax parts through their log-sum-exp.
    top = torch.maximum(prompt_max, own_max)
    a, b = (prompt_max - top).exp(), (own_max - top).exp()
    out = (prompt_out.float() * a + own_out.float() * b) / (prompt_sum * a + own_sum * b)
    return out.to(query.dtype).unsqueeze(1), None  # (A, 1, H, D)


AttentionInterface.register(NAME, prefix_shared_attention)
