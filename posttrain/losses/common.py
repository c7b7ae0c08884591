"""Masked reductions and memory-careful log-softmax helpers shared by every loss.

Masks are boolean (or 0/1) tensors broadcastable to `x`. Positions outside the mask are removed
with `masked_fill`, not multiplied by 0, so a nan/inf in padding can never leak into a result.
An empty mask gives 0 (the count is clamped to 1), never nan, and needs no host sync.

`selective_log_softmax` and `entropy_from_logits` follow TRL's helpers of the same names, with
one deliberate deviation: bf16/fp16 logits are upcast to float32 one row (or chunk) at a time,
so the result is float32-accurate while a full float32 copy of (B, T, V) is never held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is true, over `dim` (all elements when None)."""
    x = x.masked_fill(~mask.bool(), 0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the masked positions; 0 where nothing is masked in."""
    mask = mask.bool().expand_as(x)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements of `x` (all dims).

    `unbiased` applies Bessel's correction n/(n-1) like TRL's `masked_var`; where n <= 1 the
    variance is 0 (TRL raises instead, which would need a host sync).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().expand_as(x).sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements (unbiased var, as TRL/OpenRLHF).

    With `shift_mean=False` the mean is added back (only the scale changes). Positions outside
    the mask are set to 0.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask, 0)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] without materialising the (B, T, V) log-softmax.

    logits: (B, T, V); index: (B, T) token ids, all in [0, V) (replace ignore labels such as
    -100 before calling). Returns (B, T), float32 for bf16/fp16 logits (same dtype otherwise).
    One row at a time: gather the index logit, subtract the row's logsumexp.
    """
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):  # (T, V), (T,)
        row_logits = _upcast(row_logits)
        picked = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy -Σ_v p_v log p_v of softmax(logits) over the last dim: (..., V) -> (...).

    Computed in float32 for low-precision logits, `chunk_size` flattened positions at a time.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    chunks = []
    for chunk in flat.split(max(chunk_size, 1)):
        logp = F.log_softmax(_upcast(chunk), dim=-1)  # (n, V)
        chunks.append(-(logp.exp() * logp).sum(-1))
    if not chunks:  # no positions at all
        return flat.new_zeros(logits.shape[:-1], dtype=_upcast(flat).dtype)
    return torch.cat(chunks).reshape(logits.shape[:-1])


@torch.no_grad()
def clip_metrics(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float,
    eps_high: float,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """How often each side of a PPO-style clip binds (a side binds only where it limits the
    objective: the lower one for negative advantages, the upper one for positive), the mean
    ratio over `mask`, and the mean KL over `kl_mask` (default `mask`) when one is given."""
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics = {
        "clip_fraction": masked_mean((low | high).float(), mask),
        "clip_fraction_low": masked_mean(low.float(), mask),
        "clip_fraction_high": masked_mean(high.float(), mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    if kl is not None:
        metrics["kl"] = masked_mean(kl, mask if kl_mask is None else kl_mask)
    return metrics
