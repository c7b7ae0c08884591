"""Reward modelling (spec section 4): a scalar head on a causal-LM backbone trained with the
Bradley-Terry loss on preference pairs, with optional per-pair margin and centring term.

The model is `AutoModelForSequenceClassification` with num_labels=1; transformers reads the
score at the last non-pad token (through config.pad_token_id), so `OUTPUT_DIR/final` loads
with plain transformers and scores text exactly as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import OfflineAlgorithm
from posttrain.config import BaseRecipe, NonNegativeFloat, reject_unused
from posttrain.data.preference import encode_preference_file, log_data
from posttrain.data.preference_packing import (
    PackedPreferenceBatch,
    check_packing_supported,
    collate_pairs,
    forward_mask,
)
from posttrain.data.sources import describe, eval_source, train_sources
from posttrain.data.tokenized import MapOptions
from posttrain.losses.reward import bradley_terry_loss
from posttrain.losses.types import LossOutput
from posttrain.models.loading import apply_lora, load_sequence_classifier
from posttrain.utils import unwrap_model


@dataclass
class RewardConfig:
    use_margin: bool = True
    """Use the data's `margin` column (when present) in the loss: -log σ(r_w - r_l - m)."""
    centering_coef: NonNegativeFloat = 0.0
    """Coefficient c of the centring term c·(r_w + r_l)² that keeps rewards near zero."""


@dataclass
class RMRecipe(BaseRecipe):
    rm: RewardConfig = field(default_factory=RewardConfig)
    """Reward-model loss settings."""


def score_head(model) -> torch.nn.Module:
    """The scalar head (`score`) of a sequence classifier, through DDP and peft wrappers."""
    inner = unwrap_model(model)
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"{type(inner).__name__} has no `score` head; data.packing for rm needs one "
            "(set data.packing=false)"
        )
    return head


def packed_scores(model, batch: PackedPreferenceBatch) -> torch.Tensor:
    """(2B,) scores at each sequence's last token of a prefix-shared packed batch.

    The classifier pools at the last non-pad token of a row, which means nothing for a packed
    row, so the head's per-position output is taken with a forward hook and indexed instead.
    """
    captured = []
    hook = score_head(model).register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        model(
            input_ids=batch.input_ids,
            attention_mask=forward_mask(model, batch),
            position_ids=batch.position_ids,
            use_cache=False,
        )
    finally:
        hook.remove()
    return captured[-1].reshape(-1)[batch.last_index].float()


class RewardModel(OfflineAlgorithm):
    name = "rm"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg = self.cfg
        reject_unused(
            cfg,
            "rm",
            {"model.logit_chunk_tokens": "a reward model has a scalar head, no vocabulary logits"},
        )
        self.tokenizer = self.load_tokenizer()
        model = self.load_model(load_sequence_classifier, self.tokenizer.pad_token_id)
        check_packing_supported(cfg, model, accelerator.print)
        if cfg.model.lora.r > 0:
            model = apply_lora(model, cfg.model.lora, task_type="SEQ_CLS")
        options = MapOptions.from_config(cfg, accelerator)
        sources = train_sources(cfg.data)
        self.train_data = encode_preference_file(
            self.tokenizer, sources, cfg.data.max_length, options=options
        )
        self.train_examples = self.train_data.examples
        log_data(accelerator, "rm", describe(sources), self.train_data, cfg.data.max_length)
        self.eval_data = None
        held_out = eval_source(cfg.data)
        if held_out is not None:
            self.eval_data = encode_preference_file(
                self.tokenizer,
                held_out,
                cfg.data.max_length,
                limit=cfg.data.max_eval_examples,
                options=options,
            )
        self.init_sampler(accelerator)
        return model

    def collate(self, examples):
        return collate_pairs(examples, self.tokenizer.pad_token_id, self.cfg.data)

    def num_units(self, batch) -> int:
        return batch.num_pairs

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, PackedPreferenceBatch):
            scores = packed_scores(model, batch)
            return scores[: batch.num_pairs], scores[batch.num_pairs :]
        scores = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).logits
        scores = scores.squeeze(-1).float()  # (2B,)
        return scores[: batch.num_pairs], scores[batch.num_pairs :]

    def compute_loss(self, model, batch) -> LossOutput:
        chosen, rejected = self.rewards(model, batch)
        margin = batch.margin if (self.cfg.rm.use_margin and self.train_data.has_margin) else None
        return bradley_terry_loss(chosen, rejected, margin, self.cfg.rm.centering_coef)

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        model.eval()
        totals = torch.zeros(3, device=accelerator.device)  # loss sum, pairs, correct pairs
        for batch, weight in self.eval_batches(self.eval_data.examples, accelerator):
            with accelerator.autocast():
                chosen, rejected = self.rewards(model, batch)
            out = bradley_terry_loss(chosen, rejected)
            totals += weight * torch.stack(
                [out.total, out.units, (chosen > rejected).float().sum()]
            )
        totals = accelerator.reduce(totals, reduction="sum")
        model.train()
        pairs = max(float(totals[1]), 1.0)
        return {"loss": float(totals[0]) / pairs, "accuracy": float(totals[2]) / pairs}
