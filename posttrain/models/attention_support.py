"""Which attention fast paths a model can take, decided from its config and modeling code.

posttrain has four fast paths that hand the model something other than a plain padded batch:

- `sft_packing`: padding-free SFT rows (data.packing for sft). transformers turns restarting
  position_ids into a block-diagonal mask, but only for models whose mask builder is given the
  position_ids (masking_utils.find_packed_sequence_indices); OPT, for one, is not, and its
  packed examples would attend to each other. Those models get an explicit block mask.
- `custom_mask`: prefix-shared preference packing (dpo/rm data.packing) and the shared-prompt
  GRPO/PPO log-prob forward. Both pass a 4-D mask, which transformers uses as is: it then
  applies no sliding window of its own. So the windows are applied here, from position ids,
  per layer type (a `{layer type: mask}` dict for models that read one, e.g. Gemma 2/3, Qwen2/3).
- `shared_decode`: the prompt-shared decode attention of the RolloutEngine
  (rollout/prefix_shared.py), which handles soft-capping but not windows or sinks.

Each returns None when the path applies exactly, else a one-line reason; trainers print the
reason at start-up and take the plain path. `python -m posttrain.models.attention_support`
prints the table of the README's "Supported models" section for the tested families.
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Implementations that read a boolean 4-D "may attend" mask (sdpa) or an additive one (eager).
MASK_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class AttentionProfile:
    model_type: str
    implementation: str
    layer_types: tuple[str, ...]  # per layer: "full_attention", "sliding_attention", ...
    window: int | None  # the sliding window of "sliding_attention" layers
    softcap: float | None  # attention logit soft-capping (Gemma 2)
    sinks: bool  # learned attention sinks (gpt-oss)
    mask_reads_positions: bool  # the mask builder is given position_ids (packed detection)
    reads_mask_dict: bool  # forward accepts {layer type: 4-D mask}

    @property
    def windowed(self) -> bool:
        return self.window is not None and "sliding_attention" in self.layer_types

    @property
    def mixed_layers(self) -> bool:
        return len(set(self.layer_types)) > 1


def _base_model(model):
    from posttrain.utils import unwrap_model

    model = unwrap_model(model)
    return getattr(model, "base_model", model)


def _forward_source(model) -> str:
    try:
        return inspect.getsource(type(_base_model(model)).forward)
    except (OSError, TypeError):
        return ""


_MASK_CALL = re.compile(r"(create_causal_mask|create_sliding_window_causal_mask|mask_function)\(")


def _mask_calls_read_positions(source: str) -> bool:
    """Whether every mask-builder call in `source` passes position_ids (bracket-matched)."""
    calls = 0
    for match in _MASK_CALL.finditer(source):
        depth, end = 1, match.end()
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        calls += 1
        args = source[match.end() : end]
        # Gemma 2/3 build the arguments first: create_causal_mask(**mask_kwargs)
        if "position_ids" not in args and not ("**" in args and '"position_ids"' in source):
            return False
    return calls > 0


_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def profile(model) -> AttentionProfile:
    """The model's attention profile, cached per base model (forwards ask for it every step)."""
    base = _base_model(model)
    cached = _PROFILES.get(base)
    if cached is None or cached.implementation != base.config._attn_implementation:
        cached = _PROFILES[base] = _profile(base)
    return cached


def _profile(model) -> AttentionProfile:
    config = model.config
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", 0) or 0
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/3: window off by default
        window = None
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral, Mixtral, Phi-3, Qwen3-MoE: one window for every layer
        types = ["sliding_attention" if window else "full_attention"] * layers
    source = _forward_source(model)
    return AttentionProfile(
        model_type=getattr(config, "model_type", "?"),
        implementation=getattr(config, "_attn_implementation", None) or "eager",
        layer_types=tuple(types),
        window=window,
        softcap=getattr(config, "attn_logit_softcapping", None),
        sinks=getattr(config, "model_type", "") == "gpt_oss",
        mask_reads_positions=_mask_calls_read_positions(source),
        reads_mask_dict="dict)" in source and "attention_mask" in source,
    )


def custom_mask(prof: AttentionProfile) -> str | None:
    """None if a 4-D mask built by `model_mask` gives exactly the model's own attention."""
    if prof.implementation not in MASK_IMPLEMENTATIONS:
        return (
            f"attn_implementation={prof.implementation} cannot take a 4-D mask (use sdpa or eager)"
        )
    if prof.sinks:
        return "attention sinks are not reproduced by a custom mask"
    if prof.windowed and prof.mixed_layers and not prof.reads_mask_dict:
        return "sliding-window and full layers mixed, and the model reads one mask for all"
    if not set(prof.layer_types) <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(prof.layer_types))} are not plain attention"
    return None


def sft_packing(prof: AttentionProfile) -> tuple[str, str | None]:
    """("positions", None): transformers masks packed rows from position_ids; ("block_mask",
    None): pass `model_mask` of the block-diagonal layout; ("padded", reason): do not pack."""
    if prof.mask_reads_positions:  # windows included: transformers builds the mask itself
        return "positions", None
    reason = custom_mask(prof)
    if reason is None:
        return "block_mask", None
    return "padded", reason


def shared_decode(prof: AttentionProfile) -> str | None:
    if prof.implementation != "sdpa":
        return f"attn_implementation={prof.implementation} (the shared decode path mirrors sdpa)"
    if prof.sinks:
        return "attention sinks are not supported by the shared decode attention"
    if prof.windowed:
        return "sliding-window layers keep their own cache"
    return None


def model_mask(prof: AttentionProfile, allowed: Tensor, position_ids: Tensor, dtype=None):
    """The mask argument for a forward with a custom layout.

    allowed: (R, W, W) bool, query x key "may attend" ignoring windows; position_ids: (R, W).
    Sliding-window layers also drop keys whose position is `window` or more before the query's
    (transformers' `kv_idx > q_idx - window`, on positions rather than columns, which in a
    packed or shared-prompt row is the distance the token has in its own padded row).
    Eager attention adds the mask to the scores, so it gets an additive float mask.
    """

    def finish(mask: Tensor) -> Tensor:
        mask = mask.unsqueeze(1)  # (R, 1, W, W)
        if prof.implementation == "eager":
            dtype_ = dtype or torch.float32
            return torch.zeros(mask.shape, dtype=dtype_, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype_).min
            )
        return mask

    if not prof.windowed:
        return finish(allowed)
    distance = position_ids[:, :, None] - position_ids[:, None, :]  # (R, Wq, Wk)
    windowed = allowed & (distance < prof.window)
    windowed |= allowed & torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    if not prof.mixed_layers:
        return finish(windowed)
    return {"full_attention": finish(allowed), "sliding_attention": finish(windowed)}


def block_mask_from_positions(position_ids: Tensor) -> Tensor:
    """(R, W, W) causal block-diagonal "may attend" of packed rows (positions restart at 0)."""
    segment = (position_ids == 0).long().cumsum(dim=1)  # (R, W)
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return (segment[:, :, None] == segment[:, None, :]) & causal


NOTICE = {
    "sft_packing": "data.packing (padding-free sft rows)",
    "custom_mask": "the prefix-shared / shared-prompt forward",
    "shared_decode": "the prompt-shared decode attention",
}


def reason_off(model, path: str) -> str | None:
    """None if fast path `path` (a NOTICE key) applies exactly to `model`, else why not."""
    prof = profile(model)
    if path == "sft_packing":
        return sft_packing(prof)[1]
    return {"custom_mask": custom_mask, "shared_decode": shared_decode}[path](prof)


def fast_path(model, path: str, notify: Callable[[str], object] = print) -> bool:
    """Start-up gate: True if the fast path applies, else False after a one-line notice."""
    reason = reason_off(model, path)
    if reason is not None:
        notify(f"note: {NOTICE[path]} is off for {profile(model).model_type}: {reason}")
    return reason is None
