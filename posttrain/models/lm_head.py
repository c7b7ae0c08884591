"""The chunked LM head: log-probs and cross-entropy without the (B, T, V) logits.

`model.logit_chunk_tokens` (config.py) turns it on: the model runs its usual forward (through
DDP / peft / autocast wrappers, so hooks, MoE router losses and gradient sync behave as
always) with `logits_to_keep` set to no position, the final hidden states are read by a
forward hook on the base transformer, and posttrain/losses/chunked_ce.py applies the LM head
`chunk` tokens at a time (backward recomputes each chunk, or for SFT's summed loss the
gradients are taken chunk by chunk in the forward), on the positions that carry a loss only.
The default (-1, auto) is on, 256 tokens a chunk, for
vocabularies of at least 32,768 tokens, where the full float32 logits dominate memory, and off
below, where they are small. Measured (README, Performance): one SFT step at the small preset's
width with vocabulary 151,936, batch 4 × 1,024 tokens, peaked at 10,897 MiB RSS unchunked and
4,972 MiB with 256-token chunks, in about the same time (62-68 s vs 51-56 s per step on a
shared 2-core machine).

A fast path proves it applies (STYLE.md): `configure` steps aside, with a one-line notice, for
a model whose forward takes no `logits_to_keep`, has no output-embedding module, post-processes
its logits in a way this module does not reproduce, or whose chunked logits differ from its
own on a short probe input. What is reproduced: the module returned by
`get_output_embeddings()` (tied embeddings and a LoRA-wrapped head included, since the module
itself is called), then Cohere's `logit_scale` (multiply), Granite's `logits_scaling`
(divide) and Gemma 2/3's `final_logit_softcapping`, in float32 (the models themselves apply
them in the compute dtype: in bf16 the chunked numbers are the more precise ones). A model
sharded by FSDP2 / ZeRO-3 steps aside at its first forward: its head's parameters are only
whole inside the model's own forward.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.models.loading import notice
from posttrain.models.sharding import is_sharded
from posttrain.utils import unwrap_model

AUTO_MIN_VOCAB = 32_768  # auto turns chunking on from this vocabulary size
AUTO_CHUNK = 256  # tokens per chunk under auto: (256, V) float32 is 156 MB at V = 151,936
NAME = "chunked lm_head (model.logit_chunk_tokens)"


@dataclass(frozen=True)
class HeadPlan:
    chunk: int  # tokens per LM-head chunk
    scale: float | None  # logits *= scale (Cohere logit_scale)
    divide: float | None  # logits /= divide (Granite logits_scaling)
    softcap: float | None  # logits = softcap * tanh(logits / softcap) (Gemma 2/3)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> HeadPlan
_UNSHARDED: weakref.WeakSet = weakref.WeakSet()  # base models checked at their first forward


def _config(model):
    config = unwrap_model(model).config
    return getattr(config, "text_config", None) or config


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM can skip the LM head on positions we do not need."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def vocab_size(model) -> int:
    return int(getattr(_config(model), "vocab_size", 0) or 0)


def effective_chunk(tokens: int, vocab: int) -> int:
    """Tokens per chunk for a `model.logit_chunk_tokens` value: 0 off, -1 auto."""
    if tokens == -1:
        return AUTO_CHUNK if vocab >= AUTO_MIN_VOCAB else 0
    return max(tokens, 0)


def _plan_for(model, chunk: int) -> HeadPlan:
    config, base = _config(model), unwrap_model(model)
    scale = getattr(config, "logit_scale", None)
    if scale is None:  # CohereForCausalLM keeps it on the model as well
        scale = getattr(base, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadPlan(
        chunk=chunk,
        scale=None if scale in (None, 1, 1.0) else float(scale),
        divide=None if divide in (None, 1, 1.0) else float(divide),
        softcap=float(softcap) if softcap else None,
    )


def head_function(model, plan: HeadPlan) -> Callable[[Tensor], Tensor]:
    """(n, H) hidden rows -> (n, V) float32 logits, as the model's forward computes them."""
    head = unwrap_model(model).get_output_embeddings()

    def logits_of(hidden: Tensor) -> Tensor:
        logits = head(hidden).float()
        if plan.scale is not None:
            logits = logits * plan.scale
        if plan.divide is not None:
            logits = logits / plan.divide
        if plan.softcap is not None:
            logits = torch.tanh(logits / plan.softcap) * plan.softcap
        return logits

    return logits_of


def head_parameters(model) -> list[Tensor]:
    """The trainable parameters the LM head module uses (a LoRA head: its adapter; tied: the
    embedding matrix)."""
    head = unwrap_model(model).get_output_embeddings()
    return [p for p in head.parameters() if p.requires_grad]


@contextlib.contextmanager
def _captured_hidden(model) -> Iterator[list]:
    """Collects the base transformer's last hidden state (B, T, H) during a forward."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    handle = unwrap_model(model).base_model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden(model, input_ids: Tensor, **forward_kwargs) -> Tensor:
    """(B, T, H) hidden states the LM head reads, from the model's own forward, with the LM
    head applied to no position (`logits_to_keep` selects none)."""
    nothing = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    with _captured_hidden(model) as captured:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=nothing, **forward_kwargs)
    if len(captured) != 1:
        raise RuntimeError(f"expected one base-model forward, saw {len(captured)}")
    return captured[0]


def _probe_error(model, plan: HeadPlan) -> tuple[float, float]:
    """Largest |chunked - model logits| on a short input (eval mode, no grad), and the
    largest |model logit|."""
    base = unwrap_model(model)
    vocab = vocab_size(model)
    device = next(base.parameters()).device
    ids = (torch.arange(14, device=device).view(2, 7) * 7919 + 3) % max(vocab, 1)
    mask = torch.ones_like(ids)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            reference = base(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            hidden = final_hidden(base, ids, attention_mask=mask)
            plan = HeadPlan(chunk=3, scale=plan.scale, divide=plan.divide, softcap=plan.softcap)
            head = head_function(base, plan)
            rows = hidden.reshape(-1, hidden.shape[-1])
            ours = torch.cat([head(rows[i : i + 3]) for i in range(0, rows.shape[0], 3)])
    finally:
        base.train(was_training)
    error = (ours.view_as(reference) - reference).abs().max()
    return float(error), float(reference.abs().max())


def reason_off(model, plan: HeadPlan) -> str | None:
    """None if the chunked head gives the model's own logits, else why not."""
    base = unwrap_model(model)
    if not accepts_logits_to_keep(base):
        return "its forward takes no logits_to_keep"
    if base.get_output_embeddings() is None or getattr(base, "base_model", base) is base:
        return "no separate output-embedding module"
    if is_sharded(base):
        return "its parameters are sharded (FSDP2 / ZeRO-3)"
    try:
        error, largest = _probe_error(base, plan)
    except Exception as e:  # any failure means: not proven, take the plain path
        return f"the probe forward failed ({type(e).__name__}: {e})"
    # float32: rounding only. bf16/fp16 weights: the model post-processes in half precision,
    # the chunked head in float32, so they agree to a few half-precision ulps of the logits.
    dtype = next(base.parameters()).dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2 * max(1.0, largest)
    if not error <= tolerance:  # also catches nan
        return f"chunked logits differ from the model's by {error:.2g} on a probe input"
    return None


def configure(model, tokens: int) -> int:
    """Start-up gate for `model.logit_chunk_tokens`: records the plan for `model` (and the
    same base model under any wrapper) and returns the chunk size, 0 when off."""
    base = unwrap_model(model)
    chunk = effective_chunk(tokens, vocab_size(base))
    _PLANS.pop(base, None)
    if chunk == 0:
        return 0
    plan = _plan_for(base, chunk)
    reason = reason_off(base, plan)
    if reason is not None:
        notice(f"{NAME} is off for {_config(base).model_type}: {reason}")
        return 0
    _PLANS[base] = plan
    return chunk


def plan_of(model) -> HeadPlan | None:
    """The recorded plan of `model`, or None (plain path). A model sharded after start-up
    (FSDP2 / ZeRO-3 wrap it after `configure`) steps aside here, once, with a notice."""
    base = unwrap_model(model)
    plan = _PLANS.get(base)
    if plan is None or base in _UNSHARDED:
        return plan
    if is_sharded(base):
        notice(f"{NAME} is off for {_config(base).model_type}: its parameters are sharded")
        _PLANS.pop(base, None)
        return None
    _UNSHARDED.add(base)
    return plan
