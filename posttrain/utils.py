"""Small tensor and model helpers that several layers need (rollout, models, algorithms).

This module sits at the bottom of the import graph: it imports torch only, so `models/`,
`rollout/` and `algorithms/` can all use it without importing each other.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor


def unwrap_model(model):
    """The Hugging Face model under DDP / torch.compile / peft wrappers (for introspection only)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module"):  # DistributedDataParallel, accelerate wrappers
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
    return model


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions that count real tokens only, so a left-padded row is numbered exactly as
    the same row without padding; padding gets position 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def left_pad(encoded: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """(B, P) ids and mask, padded on the left so every row's last column is its last token."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def as_token_list(ids) -> list[int]:
    """Token ids from a tensor, a BatchEncoding or any sequence, as a flat list."""
    if isinstance(ids, Tensor):
        return ids.flatten().tolist()
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding
        return list(ids["input_ids"])
    return list(ids)


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the model's
    generation_config EOS (an int or a list), sorted and deduplicated."""
    ids = set()
    for source in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else as_token_list(source))
    return sorted(ids)


def resolve_named(name: str, builtins: dict, what: str, form: str, error: type[Exception]):
    """A built-in by name, or `module:attribute` imported from sys.path (recipes name tools and
    environments this way, as they name reward functions). Errors are one `error` line."""
    if ":" not in name:
        if name in builtins:
            return builtins[name]
        raise error(f"unknown {what} {name!r}: expected one of {sorted(builtins)} or '{form}'")
    module_name, _, attribute = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except Exception as failure:  # missing module or attribute, or user code failing at import
        raise error(
            f"{what} {name!r}: cannot import it ({type(failure).__name__}: {failure})"
        ) from failure
