"""Preference pairs for reward modelling and the DPO family (spec sections 4-5).

Rows have `prompt`, `chosen`, `rejected` (strings, or a message list for the prompt and
assistant message lists for the answers) and optionally `margin`. Both answers are encoded
after the same prompt; the loss mask covers the answer tokens only.

Rows that cannot teach a preference are skipped and counted, never turned into NaN:
chosen identical to rejected, an empty answer, or an answer truncated away by max_length.
A missing column is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch

from posttrain.data.batches import PreferenceBatch
from posttrain.data.collate import IGNORE, shifted_labels
from posttrain.data.encoding import encode_prompt_completion, row_tools
from posttrain.data.loading import DataError, Source, load_rows, require_columns
from posttrain.data.tokenized import (
    MapOptions,
    as_sources,
    encode_rows,
    kept_rows,
    mixed,
    summed_skips,
)

REQUIRED = ["prompt", "chosen", "rejected"]


@dataclass
class PreferenceExample:
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float = 0.0
    ref_chosen: float | None = None  # precomputed reference log-probs (DPO), filled in later
    ref_rejected: float | None = None


@dataclass
class PreferenceData:
    examples: list[PreferenceExample]
    has_margin: bool
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


def _answer_text(answer) -> str:
    if isinstance(answer, list):
        return "".join(str(m.get("content", "")) for m in answer if isinstance(m, dict))
    return answer if isinstance(answer, str) else ""


PREFERENCE_FEATURES = datasets.Features(
    {
        "chosen_ids": datasets.Sequence(datasets.Value("int64")),
        "chosen_mask": datasets.Sequence(datasets.Value("int8")),
        "rejected_ids": datasets.Sequence(datasets.Value("int64")),
        "rejected_mask": datasets.Sequence(datasets.Value("int8")),
        "margin": datasets.Value("float64"),
        "status": datasets.Value("string"),  # "ok" or the reason the row is skipped
        "truncated": datasets.Value("bool"),
        "row": datasets.Value("int64"),
    }
)


def _encode_pair(tokenizer, row: dict, max_length: int, has_margin: bool, where: str) -> dict:
    """One preference row as token ids, or the reason it cannot teach a preference."""
    out = dict(chosen_ids=[], chosen_mask=[], rejected_ids=[], rejected_mask=[], margin=0.0)
    out.update(status="ok", truncated=False)
    chosen_text, rejected_text = _answer_text(row["chosen"]), _answer_text(row["rejected"])
    if not chosen_text.strip() or not rejected_text.strip():
        return {**out, "status": "empty"}
    if row["chosen"] == row["rejected"]:
        return {**out, "status": "identical"}
    tools = row_tools(row, where)
    c_ids, c_mask = encode_prompt_completion(tokenizer, row["prompt"], row["chosen"], where, tools)
    r_ids, r_mask = encode_prompt_completion(
        tokenizer, row["prompt"], row["rejected"], where, tools
    )
    if len(c_ids) > max_length or len(r_ids) > max_length:
        out["truncated"] = True
        c_ids, c_mask, r_ids, r_mask = (
            c_ids[:max_length],
            c_mask[:max_length],
            r_ids[:max_length],
            r_mask[:max_length],
        )
        if sum(c_mask[1:]) == 0 or sum(r_mask[1:]) == 0:
            return {**out, "status": "truncated_away"}
    margin = float(row["margin"]) if has_margin and row["margin"] is not None else 0.0
    out.update(chosen_ids=c_ids, chosen_mask=c_mask, rejected_ids=r_ids, rejected_mask=r_mask)
    return {**out, "margin": margin}


def preference_batch(batch, indices, *, tokenizer, max_length, has_margin, where, offset):
    """`_encode_pair` over a batch of rows (datasets.map), one output row per input row."""
    out = {name: [] for name in PREFERENCE_FEATURES}
    for j, i in enumerate(indices):
        row = {column: values[j] for column, values in batch.items()}
        encoded = _encode_pair(
            tokenizer, row, max_length, has_margin, f"{where}: row {offset + i + 1}"
        )
        for name, value in {**encoded, "row": offset + i}.items():
            out[name].append(value)
    return out


def _encode_source(tokenizer, source: Source, max_length: int, limit, options) -> PreferenceData:
    rows = load_rows(source)
    where = str(source)
    require_columns(rows, REQUIRED, where, "'prompt', 'chosen', 'rejected' (optional 'margin')")
    has_margin = "margin" in rows.column_names
    settings = {"kind": "preference", "max_length": max_length, "margin": has_margin}

    def encode(chunk, offset):
        kwargs = dict(tokenizer=tokenizer, max_length=max_length, has_margin=has_margin)
        kwargs.update(where=where, offset=offset)
        return encode_rows(
            chunk,
            preference_batch,
            kwargs,
            settings,
            options,
            f"tokenising {where}",
            PREFERENCE_FEATURES,
        )

    kept, skipped, truncated = kept_rows(
        rows, encode, limit, ("identical", "empty", "truncated_away")
    )
    examples = [
        PreferenceExample(
            e["chosen_ids"], e["chosen_mask"], e["rejected_ids"], e["rejected_mask"], e["margin"]
        )
        for e in kept
    ]
    if not examples:
        raise DataError(f"{where}: no usable preference pairs (skipped: {skipped})")
    return PreferenceData(examples, has_margin, skipped, truncated)


def encode_preference_file(
    tokenizer,
    path: str | Source | list[Source],
    max_length: int,
    limit: int | None = None,
    options: MapOptions = MapOptions(),
) -> PreferenceData:
    """Preference pairs from one source or a weighted mixture (data/sources.py)."""
    sources = as_sources(path)
    parts = [_encode_source(tokenizer, s, max_length, limit, options) for s in sources]
    skipped = summed_skips(parts)
    return PreferenceData(
        mixed([p.examples for p in parts], sources, options.seed),
        any(p.has_margin for p in parts),
        skipped,
        sum(p.truncated for p in parts),
    )


def log_data(accelerator, name: str, path: str, data: PreferenceData, max_length: int) -> None:
    """Print (main process only) how many pairs were kept, truncated and skipped, and why."""
    if accelerator.is_main_process:
        skipped = ", ".join(f"{k}: {v}" for k, v in data.skipped.items())
        accelerator.print(
            f"{name} data: {len(data.examples)} pairs from {path} ({data.truncated} truncated to "
            f"max_length={max_length}; skipped {skipped})"
        )


def precomputed_reference(examples: list[PreferenceExample]) -> torch.Tensor | None:
    """(B, 2) precomputed reference [chosen, rejected] log-probs, or None if any is missing."""
    if any(e.ref_chosen is None for e in examples):
        return None
    return torch.tensor([[e.ref_chosen, e.ref_rejected] for e in examples], dtype=torch.float32)


def preference_collate(examples: list[PreferenceExample], pad_id: int) -> PreferenceBatch:
    """Chosen rows then rejected rows, right-padded to one width: one forward pass for both."""
    sequences = [(e.chosen_ids, e.chosen_mask) for e in examples] + [
        (e.rejected_ids, e.rejected_mask) for e in examples
    ]
    width = max(len(ids) for ids, _ in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for r, (ids, mask) in enumerate(sequences):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids)] = torch.tensor(shifted_labels(ids, mask))
        attention_mask[r, : len(ids)] = 1
    margin = torch.tensor([e.margin for e in examples], dtype=torch.float32)
    refs = precomputed_reference(examples)
    return PreferenceBatch(
        input_ids, attention_mask, labels, margin, int(attention_mask.sum()), refs
    )
