"""Unpaired preference rows for KTO (spec §14): `prompt`, `completion`, `label` (bool:
desirable or not). Strings, or a message list for the prompt and an assistant message list for
the completion, as in preference data.

Rows whose completion is empty or truncated away are skipped and counted; a missing column or a
label that is not a boolean is an error naming the file and row. Every example keeps its prompt
and completion tokens apart, so the collator can pair a prompt with another row's completion
(the mismatched pairs of KTO's reference-KL estimate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch

from posttrain.data.batches import TensorBatch
from posttrain.data.collate import IGNORE, shifted_labels
from posttrain.data.encoding import encode_prompt_completion
from posttrain.data.loading import DataError, Source, load_rows, require_columns
from posttrain.data.preference import _answer_text
from posttrain.data.tokenized import (
    MapOptions,
    as_sources,
    encode_rows,
    kept_rows,
    mixed,
    summed_skips,
)


@dataclass
class KTOExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]  # 1 on tokens that carry loss (chat templates add some that don't)
    desirable: bool


@dataclass
class KTOData:
    examples: list[KTOExample]
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


@dataclass(frozen=True)
class KTOBatch(TensorBatch):
    """Rows first, then each row's prompt with the previous row's completion (mismatched)."""

    input_ids: torch.Tensor  # (2B, T): [row_0..row_{B-1}, mismatch_0..mismatch_{B-1}]
    attention_mask: torch.Tensor  # (2B, T)
    labels: torch.Tensor  # (2B, T) shifted completion targets, -100 elsewhere
    desirable: torch.Tensor  # (B,) bool
    num_tokens: int

    @property
    def num_rows(self) -> int:
        return self.desirable.shape[0]


KTO_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.Sequence(datasets.Value("int64")),
        "completion_ids": datasets.Sequence(datasets.Value("int64")),
        "completion_mask": datasets.Sequence(datasets.Value("int8")),
        "desirable": datasets.Value("bool"),
        "status": datasets.Value("string"),  # "ok" or the reason the row is skipped
        "truncated": datasets.Value("bool"),
        "row": datasets.Value("int64"),
    }
)


def _encode_row(tokenizer, row: dict, max_length: int, where: str) -> dict:
    if not isinstance(row["label"], bool):
        raise DataError(f"{where}: label must be true or false, got {row['label']!r}")
    out = dict(prompt_ids=[], completion_ids=[], completion_mask=[], desirable=row["label"])
    out.update(status="ok", truncated=False)
    if not _answer_text(row["completion"]).strip():
        return {**out, "status": "empty"}
    ids, mask = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], where)
    if len(ids) > max_length:
        out["truncated"] = True
        ids, mask = ids[:max_length], mask[:max_length]
    if sum(mask[1:]) == 0:
        return {**out, "status": "truncated_away"}
    start = mask.index(1)  # the prompt is everything before the first loss token
    return {
        **out,
        "prompt_ids": ids[:start],
        "completion_ids": ids[start:],
        "completion_mask": mask[start:],
    }


def kto_batch(batch, indices, *, tokenizer, max_length, where, offset) -> dict:
    """`_encode_row` over a batch of rows (datasets.map), one output row per input row."""
    out = {name: [] for name in KTO_FEATURES}
    for j, i in enumerate(indices):
        row = {column: values[j] for column, values in batch.items()}
        encoded = _encode_row(tokenizer, row, max_length, f"{where}: row {offset + i + 1}")
        for name, value in {**encoded, "row": offset + i}.items():
            out[name].append(value)
    return out


def _encode_source(tokenizer, source: Source, max_length: int, limit, options) -> KTOData:
    rows = load_rows(source)
    where = str(source)
    require_columns(
        rows, ["prompt", "completion", "label"], where, "'prompt', 'completion', 'label'"
    )
    settings = {"kind": "kto", "max_length": max_length}

    def encode(chunk, offset):
        kwargs = dict(tokenizer=tokenizer, max_length=max_length, where=where, offset=offset)
        return encode_rows(
            chunk, kto_batch, kwargs, settings, options, f"tokenising {where}", KTO_FEATURES
        )

    kept, skipped, truncated = kept_rows(rows, encode, limit, ("empty", "truncated_away"))
    examples = [
        KTOExample(e["prompt_ids"], e["completion_ids"], e["completion_mask"], e["desirable"])
        for e in kept
    ]
    if not examples:
        raise DataError(f"{where}: no usable KTO rows (skipped: {skipped})")
    return KTOData(examples, skipped, truncated)


def encode_kto_file(
    tokenizer,
    path: str | Source | list[Source],
    max_length: int,
    limit: int | None = None,
    options: MapOptions = MapOptions(),
) -> KTOData:
    """KTO rows from one source or a weighted mixture (data/sources.py)."""
    sources = as_sources(path)
    parts = [_encode_source(tokenizer, s, max_length, limit, options) for s in sources]
    skipped = summed_skips(parts)
    examples = mixed([p.examples for p in parts], sources, options.seed)
    return KTOData(examples, skipped, sum(p.truncated for p in parts))


def kto_collate(examples: list[KTOExample], pad_id: int) -> KTOBatch:
    """Right-padded rows then mismatched rows (prompt i with completion i-1, cyclically)."""
    count = len(examples)
    sequences = [(e.prompt_ids, e.completion_ids, e.completion_mask) for e in examples]
    sequences += [
        (e.prompt_ids, examples[i - 1].completion_ids, examples[i - 1].completion_mask)
        for i, e in enumerate(examples)
    ]
    width = max(len(p) + len(c) for p, c, _ in sequences)
    input_ids = torch.full((2 * count, width), pad_id, dtype=torch.long)
    labels = torch.full((2 * count, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((2 * count, width), dtype=torch.long)
    for r, (prompt, completion, mask) in enumerate(sequences):
        ids = prompt + completion
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids)] = torch.tensor(shifted_labels(ids, [0] * len(prompt) + mask))
        attention_mask[r, : len(ids)] = 1
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return KTOBatch(input_ids, attention_mask, labels, desirable, int(attention_mask.sum()))
