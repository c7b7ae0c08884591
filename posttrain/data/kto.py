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

import torch

from posttrain.data.batches import TensorBatch
from posttrain.data.collate import IGNORE, shifted_labels
from posttrain.data.encoding import encode_prompt_completion
from posttrain.data.loading import DataError, load_rows, require_columns
from posttrain.data.preference import _answer_text


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


def encode_kto_file(tokenizer, path: str, max_length: int, limit: int | None = None) -> KTOData:
    rows = load_rows(path)
    require_columns(
        rows, ["prompt", "completion", "label"], path, "'prompt', 'completion', 'label'"
    )
    skipped = {"empty": 0, "truncated_away": 0}
    truncated = 0
    examples = []
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}: row {i + 1}"
        if not isinstance(row["label"], bool):
            raise DataError(f"{where}: label must be true or false, got {row['label']!r}")
        if not _answer_text(row["completion"]).strip():
            skipped["empty"] += 1
            continue
        ids, mask = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], where)
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:
            skipped["truncated_away"] += 1
            continue
        start = mask.index(1)  # the prompt is everything before the first loss token
        examples.append(KTOExample(ids[:start], ids[start:], mask[start:], row["label"]))
    if not examples:
        raise DataError(f"{path}: no usable KTO rows (skipped: {skipped})")
    return KTOData(examples, skipped, truncated)


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
