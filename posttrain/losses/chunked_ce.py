"""Token log-probs and cross-entropy from final hidden states, `chunk` tokens at a time.

The plain path materialises the logits of every position, (B, T, V), and a float32 copy of
them; at a real vocabulary (151,936 for Qwen) that tensor dominates memory and time. Here the
LM head runs on `chunk` rows of the (N, H) hidden states at a time; each chunk's float32 logits
live only inside that chunk's function. With gradients enabled every chunk is wrapped in
non-reentrant activation checkpointing, so backward recomputes the chunk's logits from its
(n, H) hidden rows instead of keeping them: neither forward nor backward ever holds more than
(chunk, V) float32 logits (and their gradient). Autograd sums each chunk's contribution into
the hidden-state gradient and into the head's parameters (tied embeddings and LoRA included,
since `head` is whatever module the model uses, called per chunk). A summed cross-entropy
(SFT) has a scalar upstream gradient, so given the head's parameters it skips the recompute:
each chunk's gradients are taken in the forward and only scaled in backward (as Liger-Kernel's
fused linear cross-entropy does), for the plain path's three head matmuls instead of four.

Values equal the plain `log_softmax(head(h) / T).gather(...)` / `cross_entropy(head(h))` up to
float rounding (tests/test_chunked_logprobs.py: 1e-5, values and gradients). This is the
"chunked loss" trick of Liger-Kernel's fused linear cross-entropy and of torchtune's
`CEWithChunkedOutputLoss`, in plain torch.

`head` maps (n, H) hidden rows to (n, V) float32 logits, with the model's own logit
post-processing (scaling, soft-capping) already applied (posttrain/models/lm_head.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]


def _over_chunks(fn, hidden: Tensor, targets: Tensor, chunk: int) -> list[tuple[Tensor, ...]]:
    """fn(hidden rows, target rows) -> tuple of per-chunk outputs, for each chunk of rows;
    checkpointed (recomputed in backward) when a gradient will flow back through it."""
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    step = max(int(chunk), 1)
    outs = []
    for start in range(0, hidden.shape[0], step):
        h, t = hidden[start : start + step], targets[start : start + step]  # (n, H), (n,)
        if recompute:
            outs.append(checkpoint(fn, h, t, use_reentrant=False))
        else:
            outs.append(fn(h, t))
    return outs


def chunked_token_logprobs(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    chunk: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(N,) float32 log softmax(head(hidden) / T)[target] of each row, and with
    return_entropy the (N,) entropy of that distribution.

    hidden: (N, H) final hidden states of the positions that predict `targets` (N,).
    temperature: T > 0 (callers map greedy T = 0 to 1).
    """

    def rows(h: Tensor, t: Tensor):
        logits = head(h)  # (n, V) float32
        if temperature != 1.0:
            logits = logits / temperature
        if return_entropy:
            logp = logits.log_softmax(dim=-1)  # (n, V)
            picked = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            return picked, -(logp.exp() * logp).sum(dim=-1)
        picked = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        return (picked,)

    if hidden.shape[0] == 0:  # nothing to score: keep the graph (and dtype) consistent
        empty = hidden.float().sum(-1)  # (0,), still attached to the graph
        return (empty, empty) if return_entropy else empty
    outs = _over_chunks(rows, hidden, targets, chunk)
    logprobs = torch.cat([o[0] for o in outs])
    if return_entropy:
        return logprobs, torch.cat([o[1] for o in outs])
    return logprobs


def chunked_cross_entropy(
    hidden: Tensor,
    head: Head,
    labels: Tensor,
    chunk: int,
    ignore_index: int = -100,
    params: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed float32 cross-entropy of head(hidden) against `labels`, the number of counted
    labels, and how many of them are the argmax (token accuracy numerator).

    hidden: (N, H); labels: (N,) aligned to the rows; rows labelled `ignore_index` count
    nothing (callers usually drop them before, so the head never runs on them).
    params: the trainable parameters `head` uses. Given, and with a gradient to compute, the
    gradients are taken in the forward chunk by chunk (`_CrossEntropyGrads`): a summed loss has
    a scalar upstream gradient, so nothing needs recomputing in backward (three head matmuls
    per chunk, as the plain path, instead of four).
    """
    valid = labels != ignore_index
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in params)
    )
    if params and needs_grad and hidden.shape[0] > 0:
        total, correct = _CrossEntropyGrads.apply(
            hidden, labels, head, chunk, ignore_index, *params
        )
        return total, valid.sum().float(), correct

    def rows(h: Tensor, t: Tensor):
        logits = head(h)  # (n, V) float32
        loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
        hits = ((logits.detach().argmax(-1) == t) & (t != ignore_index)).sum()
        return loss, hits

    # an empty chunk list still gives a 0 attached to the graph (hidden is (0, H) then)
    total = (
        hidden.float().sum() if hidden.shape[0] == 0 else hidden.new_zeros((), dtype=torch.float32)
    )
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for loss, hits in _over_chunks(rows, hidden, labels, chunk):
        total, correct = total + loss, correct + hits
    return total, valid.sum().float(), correct


class _CrossEntropyGrads(torch.autograd.Function):
    """Summed cross-entropy whose gradients (to the hidden rows and to the head's parameters)
    are computed in the forward, one chunk at a time, and scaled by the upstream scalar in
    backward: the (chunk, V) logits and their gradient exist only inside one chunk's step."""

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk, ignore_index, *params):
        step = max(int(chunk), 1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)  # (N, H)
        grad_params: list[Tensor | None] = [None] * len(params)
        for start in range(0, hidden.shape[0], step):
            t = labels[start : start + step]  # (n,)
            with torch.enable_grad():
                h = hidden[start : start + step].detach().requires_grad_(True)  # (n, H)
                logits = head(h)  # (n, V) float32
                loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
                grads = torch.autograd.grad(loss, [h, *params], allow_unused=True)
            total += loss.detach()
            correct += ((logits.detach().argmax(-1) == t) & (t != ignore_index)).sum()
            grad_hidden[start : start + step] = grads[0]
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        ctx.param_has_grad = [g is not None for g in grad_params]
        ctx.save_for_backward(grad_hidden, *[g for g in grad_params if g is not None])
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        grad_hidden, *saved = ctx.saved_tensors
        grad_params, kept = [], iter(saved)
        for has in ctx.param_has_grad:
            grad_params.append(next(kept) * grad_total if has else None)
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype),
            None,
            None,
            None,
            None,
            *grad_params,
        )
