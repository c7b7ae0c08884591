"""Mixture-of-experts router losses and load diagnostics (spec §10).

- Load balancing: Switch Transformer, Fedus et al. 2022, eqs. 4-6: N_E · Σ_i f_i · P_i with
  P_i the mean router probability of expert i. For top-k routing f_i is the fraction of the
  tokens·k token-slot assignments that go to expert i (counts / (tokens·k)), so f sums to 1,
  perfectly uniform routing gives exactly 1 for every k, and k = 1 is the Switch formula.
  The loss is computed per layer and averaged over layers. The coefficient α is NOT applied.
  Deliberate deviation from Hugging Face's `load_balancing_loss_func`: HF does not divide the
  counts by k (its value is k times ours) and pools all layers' tokens before taking f·P.
- Router z-loss: ST-MoE, Zoph et al. 2022, eq. 5: mean_tokens (logsumexp_j z_j)², averaged
  over layers.
- Aux-loss-free balancing: DeepSeek-V3 (DeepSeek-AI 2024, §2.1.2): the selection bias b_i is
  raised by γ for an underloaded expert (load below the mean) and lowered by γ for an
  overloaded one; an expert exactly at the mean keeps its bias.

`router_logits` is a tensor (tokens, E) for one layer or a tuple of them, one per layer, as
Hugging Face MoE models return with `output_router_logits=True`. `token_mask` (tokens,) drops
padding tokens and applies to every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses.common import masked_mean

RouterLogits = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def _layers(router_logits: RouterLogits) -> list[torch.Tensor]:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits.float()]
    return [layer.float() for layer in router_logits]


def _token_mask(layer: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(layer.shape[0], dtype=torch.bool, device=layer.device)
    return token_mask.reshape(-1).bool().to(layer.device)  # (tokens,)


def _slot_counts(logits: torch.Tensor, top_k: int, keep: torch.Tensor) -> torch.Tensor:
    """(tokens, E) how many of each kept token's k slots went to each expert (0 or 1)."""
    chosen = logits.topk(top_k, dim=-1).indices  # (tokens, k)
    counts = F.one_hot(chosen, logits.shape[-1]).sum(dim=1).float()  # (tokens, E)
    return counts * keep.unsqueeze(1)


def load_balancing_loss(
    router_logits: RouterLogits,
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """N_E · Σ_i f_i · P_i per layer, averaged over layers (scalar, differentiable via P)."""
    losses = []
    for logits in _layers(router_logits):  # (tokens, E)
        keep = _token_mask(logits, token_mask)  # (tokens,)
        probs = logits.softmax(dim=-1)  # (tokens, E)
        slots = _slot_counts(logits, top_k, keep).sum(dim=0)  # (E,)
        fraction = slots / (keep.sum().clamp(min=1) * top_k)  # (E,) f_i
        mean_prob = masked_mean(probs, keep.unsqueeze(1), dim=0)  # (E,) P_i
        losses.append(num_experts * (fraction * mean_prob).sum())
    return torch.stack(losses).mean()


def router_z_loss(
    router_logits: RouterLogits, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """mean over kept tokens of (logsumexp_j z_j)², averaged over layers (scalar)."""
    losses = []
    for logits in _layers(router_logits):  # (tokens, E)
        keep = _token_mask(logits, token_mask)
        losses.append(masked_mean(torch.logsumexp(logits, dim=-1) ** 2, keep))
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_load(
    router_logits: RouterLogits, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(E,) fraction of all token-slot assignments (every layer pooled) going to each expert."""
    slots, assignments = None, 0.0
    for logits in _layers(router_logits):
        keep = _token_mask(logits, token_mask)
        layer_slots = _slot_counts(logits, top_k, keep).sum(dim=0)  # (E,)
        slots = layer_slots if slots is None else slots + layer_slots
        assignments = assignments + keep.sum() * top_k
    return slots / torch.as_tensor(assignments).clamp(min=1)


@torch.no_grad()
def load_stats(fractions: torch.Tensor) -> dict[str, torch.Tensor]:
    """min, max and coefficient of variation (population std / mean) of per-expert loads (E,)."""
    fractions = fractions.float()
    return {
        "min": fractions.min(),
        "max": fractions.max(),
        "cv": fractions.std(correction=0) / fractions.mean(),
    }


@torch.no_grad()
def router_entropy(
    router_logits: RouterLogits, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution per token, averaged over layers."""
    entropies = []
    for logits in _layers(router_logits):
        keep = _token_mask(logits, token_mask)
        logp = logits.log_softmax(dim=-1)  # (tokens, E)
        entropies.append(masked_mean(-(logp.exp() * logp).sum(-1), keep))
    return torch.stack(entropies).mean()


@torch.no_grad()
def aux_free_bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """New bias (E,): b_i + γ if load_i < mean load, b_i - γ if load_i > mean load."""
    return bias + gamma * torch.sign(load.float().mean() - load.float()).to(bias.dtype)
