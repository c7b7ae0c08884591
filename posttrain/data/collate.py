"""Collation: padded batches and padding-free packed rows (spec section 3).

Labels are shifted here, once: `labels[t]` is the token at t+1 when that token is a training
target, else -100. Shifting per example (not per row) is what makes packing exact: the last
token of one example never learns to predict the first token of the next.
"""

from __future__ import annotations

import torch

from posttrain.data.batches import SFTBatch
from posttrain.data.encoding import EncodedExample

IGNORE = -100


def shifted_labels(ids: list[int], loss_mask: list[int]) -> list[int]:
    return [ids[t + 1] if loss_mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def pad_collate(examples: list[EncodedExample], pad_id: int) -> SFTBatch:
    """Right-padded (B, T) batch with an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(shifted_labels(ex.input_ids, ex.loss_mask))
        attention_mask[row, :n] = 1
    position_ids = torch.arange(width).expand(batch, width).clone()
    return SFTBatch(input_ids, labels, position_ids, attention_mask, int(attention_mask.sum()))


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: group example indices into rows of at most row_length tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    return rows


def pack_collate(examples: list[EncodedExample], pad_id: int, row_length: int) -> SFTBatch:
    """Concatenate examples into rows; position_ids restart at 0 for each example.

    No attention mask is returned: transformers derives a block-diagonal mask from the
    restarting position_ids (masking_utils.find_packed_sequence_indices), so attention never
    crosses examples. The pad tail of a row is its own segment (positions from 0) with no loss.
    """
    row_length = max(row_length, max(len(e.input_ids) for e in examples))
    groups = pack_rows([len(e.input_ids) for e in examples], row_length)
    width = max(sum(len(examples[i].input_ids) for i in g) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    num_tokens = 0
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[row, start : start + n] = torch.tensor(ex.input_ids)
            labels[row, start : start + n] = torch.tensor(
                shifted_labels(ex.input_ids, ex.loss_mask)
            )
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
        num_tokens += start
        position_ids[row, start:] = torch.arange(width - start)
    return SFTBatch(input_ids, labels, position_ids, None, num_tokens)
