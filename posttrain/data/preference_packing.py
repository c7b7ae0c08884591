"""Padding-free, prefix-shared preference batches (`data.packing: true` for rm and dpo).

A pair's chosen and rejected sequences share their prompt, and on preference data the prompt is
most of the tokens. Packing lays a pair out once as a segment

    [shared prefix | chosen suffix | rejected suffix]

with position ids that restart at the end of the prefix for the rejected suffix, and a 4-D
attention mask in which every token sees the earlier tokens of its own sequence only: the
rejected suffix sees the prefix but not the chosen suffix, and no token sees another segment.
Each token's hidden state is then exactly what it is in its own padded row, so the
log-probs and scores are those of the padded batch (tested), for about half the tokens and no
padding. Segments are packed first-fit into rows of `row_length` tokens.

Because the prefix is shared, its last token predicts the first answer token of both
sequences, so targets are not shifted labels: each completion token names the flat position of
the token that predicts it (`target_index`), its id and the sequence it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import reject_unused
from posttrain.data.batches import TensorBatch
from posttrain.data.collate import pack_rows
from posttrain.data.preference import precomputed_reference, preference_collate
from posttrain.models import attention_support
from posttrain.models.attention_support import fast_path


@dataclass(frozen=True)
class PackedPreferenceBatch(TensorBatch):
    """Sequence s in [0, 2B): chosen of pair i is s = i, rejected of pair i is s = B + i."""

    input_ids: torch.Tensor  # (R, W)
    position_ids: torch.Tensor  # (R, W)
    attention_mask: torch.Tensor  # (R, 1, W, W) bool, True = may attend
    target_index: torch.Tensor  # (N,) flat index into R*W of the position predicting each token
    target_ids: torch.Tensor  # (N,) the completion tokens
    target_seq: torch.Tensor  # (N,) which sequence each completion token belongs to
    last_index: torch.Tensor  # (2B,) flat index of each sequence's last token (RM score)
    margin: torch.Tensor | None  # (B,)
    num_tokens: int  # non-pad tokens of chosen + rejected, as a padded batch counts them
    computed_tokens: int  # tokens actually run through the model (prefix once, no padding)
    pairs: int
    ref_logps: torch.Tensor | None = None  # (B, 2) precomputed reference log-probs

    @property
    def num_pairs(self) -> int:
        return self.pairs


FORMAT_REASON = "preference rows always have prompt, chosen and rejected columns"
TRUNCATION_REASON = "over-long pairs keep their first data.max_length tokens (sft only)"


def check_packing_supported(cfg, model, notify=print) -> None:
    """data.format and data.truncation_side are not read by preference trainers (rejected when
    set); data.packing stays on
    only where the 4-D mask reproduces the model's own attention (attention_support.custom_mask:
    sdpa or eager, windows per layer type, no sinks); else a one-line notice and padded batches."""
    reject_unused(
        cfg,
        type(cfg).__name__.removesuffix("Recipe").lower(),
        {"data.format": FORMAT_REASON, "data.truncation_side": TRUNCATION_REASON},
    )
    if cfg.data.packing and not fast_path(model, "custom_mask", notify):
        cfg.data.packing = False


def forward_mask(model, batch: PackedPreferenceBatch):
    """The batch's "may attend" mask in the form the model reads (windows, eager, per layer)."""
    prof = attention_support.profile(model)
    return attention_support.model_mask(prof, batch.attention_mask[:, 0], batch.position_ids)


def collate_pairs(examples: list, pad_id: int, data_cfg):
    """rm's and dpo's batches: prefix-shared packed rows with data.packing, else padded rows
    (a packed row holds up to two max-length pairs)."""
    if data_cfg.packing:
        return packed_preference_collate(examples, pad_id, 2 * data_cfg.max_length)
    return preference_collate(examples, pad_id)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """Longest common prefix, leaving each sequence at least one token of its own."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _offset(t: int, shared: int, own: int) -> int:
    """Where token t of a sequence sits in its segment: the shared prefix, else its own suffix
    (which starts at `own`)."""
    return t if t < shared else own + t - shared


def packed_preference_collate(
    examples: list, pad_id: int, row_length: int
) -> PackedPreferenceBatch:
    pairs = len(examples)
    layouts = []  # (shared, chosen suffix, rejected suffix) lengths per pair
    for e in examples:
        shared = _shared_prefix(e.chosen_ids, e.rejected_ids)
        layouts.append((shared, len(e.chosen_ids) - shared, len(e.rejected_ids) - shared))
    lengths = [sum(layout) for layout in layouts]
    row_length = max(row_length, max(lengths))
    rows = pack_rows(lengths, row_length)
    width = max(sum(lengths[i] for i in group) for group in rows)

    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width, width), dtype=torch.bool)
    target_index, target_ids, target_seq = [], [], []
    last_index = [0] * (2 * pairs)
    for r, group in enumerate(rows):
        start = 0
        for i in group:
            e, (shared, c_len, r_len) = examples[i], layouts[i]
            end = start + shared + c_len + r_len
            block = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            c0 = shared  # chosen suffix starts here (relative to the segment)
            r0 = shared + c_len  # rejected suffix starts here
            block[r0:, c0:r0] = False  # the rejected answer never sees the chosen one
            mask[r, start:end, start:end] = block
            input_ids[r, start:end] = torch.tensor(e.chosen_ids + e.rejected_ids[shared:])
            position_ids[r, start : start + r0] = torch.arange(r0)
            position_ids[r, start + r0 : end] = torch.arange(shared, shared + r_len)

            base = r * width + start
            for seq, ids, loss_mask, own in (
                (i, e.chosen_ids, e.chosen_mask, c0),
                (pairs + i, e.rejected_ids, e.rejected_mask, r0),
            ):
                for t in range(1, len(ids)):
                    if loss_mask[t]:
                        target_index.append(base + _offset(t - 1, shared, own))
                        target_ids.append(ids[t])
                        target_seq.append(seq)
                last_index[seq] = base + _offset(len(ids) - 1, shared, own)
            start = end
        # Pad tail: each pad token attends to itself only, so no softmax row is empty (NaN).
        tail = torch.arange(start, width)
        mask[r, tail, tail] = True

    return PackedPreferenceBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask.unsqueeze(1),
        target_index=torch.tensor(target_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_seq=torch.tensor(target_seq, dtype=torch.long),
        last_index=torch.tensor(last_index, dtype=torch.long),
        margin=torch.tensor([e.margin for e in examples], dtype=torch.float32),
        num_tokens=sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples),
        computed_tokens=sum(lengths),
        pairs=pairs,
        ref_logps=precomputed_reference(examples),
    )
