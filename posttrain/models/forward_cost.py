"""Forward FLOPs of a decoder, to choose between two exact layouts of one computation.

A layout that puts several sequences in one row behind a 4-D attention mask (the shared-prompt
forward: one prompt, then its G completions) runs fewer tokens through the linear layers, but
the attention kernel still computes every query-key pair of the row: the mask hides pairs, it
does not skip them (sdpa's math and memory-efficient kernels, on CPU and CUDA). With short
prompts and long completions the row's width² attention outgrows what the shared prompt
saves, so the caller asks which layout costs less before it picks one. Both layouts give the
same numbers (tested); only the cost differs.
"""

from __future__ import annotations

import weakref

import torch

from posttrain.models.loading import notice
from posttrain.utils import unwrap_model

# Per base model: its costs, and whether the step-aside notice was printed (the check runs on
# every log-prob pass; the parameter walk and the notice happen once).
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NOTICED: weakref.WeakSet = weakref.WeakSet()


def token_and_pair_flops(model) -> tuple[int, int] | None:
    """(forward FLOPs per token of the weight matmuls outside the embedding and LM head,
    forward FLOPs per attended query-key pair summed over layers: QKᵀ and attention·V), or None
    when the config does not say how many heads and layers there are. `model` may be wrapped
    (DDP, peft, torch.compile)."""
    model = unwrap_model(model)
    if model not in _COSTS:
        _COSTS[model] = _count(model)
    return _COSTS[model]


def _count(model) -> tuple[int, int] | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    pair = 4 * heads * head_dim * layers
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if isinstance(module, torch.nn.Module):
            skip.update(id(p) for p in module.parameters())
    # Every matrix counts once per token (2 FLOPs per weight). MoE experts are counted as if all
    # were active, which overstates the token cost and so favours the shared layout, as before
    # this check existed.
    weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in skip)
    return 2 * weights, pair


def shared_prompt_saves_work(model, prompt_width: int, completion_width: int, group: int) -> bool:
    """Whether one [prompt | G completions] row per group (width P + G·C) costs fewer forward
    FLOPs than G rows [prompt; completion] of width P + C (backward scales alike)."""
    costs = token_and_pair_flops(model)
    if costs is None:  # nothing to weigh: the shared row, as before this check existed
        return True
    per_token, per_pair = costs
    P, C, G = prompt_width, completion_width, group
    shared = (P + G * C) * per_token + (P + G * C) ** 2 * per_pair
    plain = G * ((P + C) * per_token + (P + C) ** 2 * per_pair)
    base = unwrap_model(model)
    if shared >= plain and base not in _NOTICED:
        _NOTICED.add(base)
        notice(
            f"the shared-prompt forward steps aside where {G} plain rows cost fewer FLOPs "
            f"(first at prompt width {P}, completion width {C}): long completions make the "
            "shared row's attention outgrow the prompt it saves; same log-probs either way"
        )
    return shared < plain
