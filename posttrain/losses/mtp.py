"""Multi-token prediction heads and speculative acceptance (spec §11).

Label convention. The data pipeline gives labels already aligned to positions:
labels[b, i] = token i+1 (what the main head at position i predicts). Extra head k (k = 0 is
the first extra head, DeepSeek-V3 depth k+1, Medusa head k+1) at position i predicts token
i+k+2 = labels[b, i+k+1], so `mtp_labels` shifts the labels left by k+1 and fills the last k+1
positions with ignore_index. For packed rows, pass `position_ids` (B, T) and targets whose
input position i+k+1 belongs to a different example than position i are ignored as well.

Loss: DeepSeek-V3 (DeepSeek-AI 2024, eq. 25): L_MTP = (λ/D) Σ_k CE_k, each CE_k the token mean
over head k's valid targets in this micro-batch. Because the D means have different token counts,
this loss is returned with units = 1 and total = L_MTP: summed over micro-batches and divided by
the global units it is the MEAN over micro-batches of the per-micro-batch value, not a global
token mean (a deliberate simplification for an auxiliary loss).

Acceptance: greedy (longest prefix agreeing with the verifier's argmax) and the lossless
speculative sampling rule of Leviathan et al. 2023 / Chen et al. 2023 (Algorithm 2).
"""

from __future__ import annotations

import torch

from posttrain.losses.sft import cross_entropy_loss
from posttrain.losses.types import LossOutput


def mtp_labels(
    labels: torch.Tensor,
    depth_k: int,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets (B, T) for extra head `depth_k` (0-based): out[:, i] = labels[:, i+depth_k+1]."""
    shift = depth_k + 1
    out = torch.full_like(labels, ignore_index)  # (B, T)
    if shift >= labels.shape[1]:
        return out
    out[:, :-shift] = labels[:, shift:]
    if position_ids is not None:
        # same example iff the position id advanced by exactly `shift` (ids restart at 0)
        same = position_ids[:, shift:] - position_ids[:, :-shift] == shift  # (B, T - shift)
        out[:, :-shift] = out[:, :-shift].masked_fill(~same, ignore_index)
    return out


def mtp_loss(
    head_logits: list[torch.Tensor],
    labels: torch.Tensor,
    weight: float,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """(λ/D) Σ_k CE_k over D extra heads. head_logits[k]: (B, T, V); labels: (B, T) aligned.

    units = 1 (see module docstring). Metrics mtp_loss_{k}, mtp_acc_{k} per head.
    """
    depth = len(head_logits)
    total = labels.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {}
    for k, logits in enumerate(head_logits):
        targets = mtp_labels(labels, k, ignore_index, position_ids)  # (B, T)
        head = cross_entropy_loss(logits, targets, ignore_index, chunk_size)
        head_mean = head.total / head.units.clamp(min=1)
        total = total + head_mean
        metrics[f"mtp_loss_{k}"] = head_mean.detach()
        metrics[f"mtp_acc_{k}"] = head.metrics["token_accuracy"]
    total = total * (weight / max(depth, 1))
    return LossOutput(total=total, units=torch.ones((), device=labels.device), metrics=metrics)


def greedy_accept_rows(drafts: torch.Tensor, target_argmax: torch.Tensor):
    """Greedy verification of A rows at once. drafts: (A, K); target_argmax: (A, K+1), the
    verifier's argmax at each drafted position plus the one after. Returns (accepted (A,),
    next_token (A,)): the longest agreeing prefix and the verifier's token after it (a
    correction, or the bonus token when all K agree)."""
    num_draft = drafts.shape[1]
    agree = (drafts == target_argmax[:, :num_draft]).long()  # (A, K)
    accepted = agree.cumprod(dim=1).sum(dim=1)  # (A,)
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    return accepted, target_argmax[rows, accepted]


def speculative_accept_rows(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
):
    """Lossless speculative sampling of A rows at once.

    drafts: (A, K) sampled from q; draft_probs q: (A, K, V); target_probs p: (A, K+1, V), the
    verifier's distributions at the K drafted positions and the one after. Draft i is accepted
    with probability min(1, p_i(x_i)/q_i(x_i)); at the first rejection the next token is sampled
    from normalise(max(0, p_i - q_i)); if all K are accepted a bonus token is sampled from p_K.
    `generator` must live on the device of the probabilities. Returns (accepted (A,),
    next_token (A,)).
    """
    num_rows, num_draft = drafts.shape
    rows = torch.arange(num_rows, device=drafts.device)
    p_draft = target_probs[:, :num_draft].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (A, K)
    q_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (A, K)
    uniform = torch.rand(q_draft.shape, generator=generator, device=q_draft.device)
    # accept iff u < p/q, written u*q < p (no division by q); a sentinel column ends the scan
    sentinel = torch.ones(num_rows, 1, dtype=torch.bool, device=drafts.device)
    rejected = torch.cat([uniform * q_draft >= p_draft, sentinel], dim=1)  # (A, K+1)
    accepted = rejected.int().argmax(dim=1)  # (A,) first rejection, K if none
    # q = 0 after the last draft, so the residual there is p_K itself: the bonus token
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(num_rows, 1, target_probs.shape[-1])], 1)
    p_at, q_at = target_probs[rows, accepted], q_pad[rows, accepted]  # (A, V)
    residual = (p_at - q_at).clamp(min=0)
    # an all-zero residual means p = q there, where rejection has probability 0: use p
    dist = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
    return accepted, torch.multinomial(dist, 1, generator=generator).squeeze(-1)


def greedy_accept(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int]:
    """`greedy_accept_rows` for one row. draft_tokens: (K,); target_argmax: (K+1,).
    Returns (n_accepted, next_token)."""
    accepted, next_token = greedy_accept_rows(draft_tokens[None], target_argmax[None])
    return int(accepted[0]), int(next_token[0])


def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """`speculative_accept_rows` for one row. draft_tokens: (K,); draft_probs: (K, V);
    target_probs: (K+1, V). Returns (n_accepted, next_token)."""
    accepted, next_token = speculative_accept_rows(
        draft_tokens[None], draft_probs[None], target_probs[None], generator
    )
    return int(accepted[0]), int(next_token[0])
