"""Supervised fine-tuning (spec section 3): cross-entropy on assistant/completion tokens only,
normalised by the number of target tokens in the global batch, optionally padding-free packed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import OfflineAlgorithm
from posttrain.config import BaseRecipe
from posttrain.data.collate import pack_collate, pad_collate
from posttrain.data.encoding import EncodedExample, detect_format, encode_sft_row
from posttrain.data.loading import DataError, load_rows
from posttrain.losses.sft import cross_entropy_loss
from posttrain.losses.types import LossOutput
from posttrain.models.loading import apply_lora, load_causal_lm, load_tokenizer


@dataclass
class SFTRecipe(BaseRecipe):
    """SFT has no section of its own: model, data, optim, train, logging."""


@dataclass
class EncodedData:
    examples: list[EncodedExample]
    truncated: int
    skipped: int


def encode_sft_file(
    tokenizer, path: str, fmt: str, max_length: int, limit: int | None = None
) -> EncodedData:
    """Load and tokenize an SFT data file; rows with no target tokens are skipped and counted."""
    rows = load_rows(path)
    fmt = detect_format(rows.column_names, path, fmt)
    examples, truncated, skipped = [], 0, 0
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        ex = encode_sft_row(tokenizer, row, fmt, max_length, where=f"{path}: row {i + 1}")
        truncated += ex.truncated
        if sum(ex.loss_mask[1:]) == 0:  # nothing left to learn (e.g. truncated away)
            skipped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(
            f"{path}: no usable rows ({skipped} had no completion tokens within max_length)"
        )
    return EncodedData(examples, truncated, skipped)


def forward_logits(model, batch) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits  # (B, T, V)


class SFT(OfflineAlgorithm):
    name = "sft"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        model = load_causal_lm(cfg.model)
        if cfg.model.lora.r > 0:
            model = apply_lora(model, cfg.model.lora)
        self.train_data = encode_sft_file(
            self.tokenizer, cfg.data.train_path, cfg.data.format, cfg.data.max_length
        )
        self.eval_data = None
        if cfg.data.eval_path:
            self.eval_data = encode_sft_file(
                self.tokenizer,
                cfg.data.eval_path,
                cfg.data.format,
                cfg.data.max_length,
                limit=cfg.data.max_eval_examples,
            )
        self.train_examples = self.train_data.examples
        self.init_sampler(accelerator)
        if accelerator.is_main_process:
            d = self.train_data
            accelerator.print(
                f"sft data: {len(d.examples)} examples from {cfg.data.train_path} "
                f"({d.truncated} truncated to max_length={cfg.data.max_length}, {d.skipped} skipped)"
            )
        return model

    def collate(self, examples: list[EncodedExample]):
        if self.cfg.data.packing:
            return pack_collate(examples, self.tokenizer.pad_token_id, self.cfg.data.max_length)
        return pad_collate(examples, self.tokenizer.pad_token_id)

    def num_units(self, batch) -> int:
        return batch.num_loss_tokens

    def compute_loss(self, model, batch) -> LossOutput:
        return cross_entropy_loss(forward_logits(model, batch), batch.labels)

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        model.eval()
        totals = torch.zeros(3, device=accelerator.device)  # loss sum, units, correct tokens
        for batch in self.eval_batches(self.eval_data.examples, accelerator):
            with accelerator.autocast():
                out = self.compute_loss(model, batch)
            totals += torch.stack(
                [
                    out.total.float(),
                    out.units.float(),
                    out.metrics["token_accuracy"].float() * out.units.float(),
                ]
            )
        totals = accelerator.reduce(totals, reduction="sum")
        model.train()
        units = max(float(totals[1]), 1.0)
        return {"loss": float(totals[0]) / units, "token_accuracy": float(totals[2]) / units}
