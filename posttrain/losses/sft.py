"""Supervised fine-tuning loss: token cross-entropy over response tokens (spec §3).

`labels` are ALREADY aligned with `logits` (labels[b, t] is the token that logits[b, t] must
predict); the data pipeline does the shift, so nothing is shifted here. Tokens labelled
`ignore_index` (prompt, system, padding, packing boundaries) contribute neither loss nor units.

The loss is computed in float32 whatever the logits dtype. With `chunk_size`, the N = B*T
positions are processed `chunk_size` at a time and, when gradients are needed, each chunk is
wrapped in activation checkpointing so its float32 log-softmax is recomputed in backward rather
than kept: the full (N, V) float32 tensor never exists, in forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.losses.types import LossOutput


def _chunk_ce_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # (n, V), (n,) -> scalar float32 sum over non-ignored positions
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> LossOutput:
    """Summed token cross-entropy; units = number of labels != ignore_index.

    logits: (B, T, V) any float dtype; labels: (B, T) aligned to logits.
    Metric `token_accuracy`: fraction of counted tokens whose argmax logit equals the label.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    valid = flat_labels != ignore_index  # (N,)
    step = max(flat_labels.shape[0] if chunk_size is None else chunk_size, 1)
    recompute = chunk_size is not None and torch.is_grad_enabled() and flat_logits.requires_grad

    total = flat_logits.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=flat_logits.device)
    for start in range(0, flat_labels.shape[0], step):
        chunk_logits = flat_logits[start : start + step]  # (n, V)
        chunk_labels = flat_labels[start : start + step]  # (n,)
        if recompute:
            chunk_loss = checkpoint(
                _chunk_ce_sum, chunk_logits, chunk_labels, ignore_index, use_reentrant=False
            )
        else:
            chunk_loss = _chunk_ce_sum(chunk_logits, chunk_labels, ignore_index)
        total = total + chunk_loss
        with torch.no_grad():
            hits = (chunk_logits.argmax(-1) == chunk_labels) & valid[start : start + step]
            correct = correct + hits.sum()

    units = valid.sum().float()
    metrics = {"token_accuracy": correct.float() / units.clamp(min=1)}
    return LossOutput(total=total, units=units, metrics=metrics)
