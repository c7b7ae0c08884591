"""The DPO family (spec sections 5, 14): sigmoid (DPO), cdpo (label-smoothed), robust
(Chowdhury et al.), hinge (SLiC), IPO, SimPO, ORPO.

Chosen and rejected go through one concatenated forward pass; log-probs are summed over the
completion tokens only. The reference is, in order of preference:
- `dpo.precompute_ref_logps=true`: one pass over the data before training, cached in the
  examples; no reference forward (and no reference weights) during training;
- with LoRA: the policy itself with the adapter disabled (no second copy of the weights);
- otherwise: a frozen copy (`dpo.reference` or the starting checkpoint).
SimPO and ORPO are reference-free and load none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from posttrain.algorithms.base import OfflineAlgorithm, process_batches
from posttrain.algorithms.rl_common import load_reference
from posttrain.config import BaseRecipe, NonNegativeFloat, PositiveFloat, Range
from posttrain.data.preference import encode_preference_file, log_data
from posttrain.data.preference_packing import (
    PackedPreferenceBatch,
    check_packing_supported,
    collate_pairs,
    forward_mask,
)
from posttrain.data.sources import describe, eval_source, train_sources
from posttrain.data.tokenized import MapOptions
from posttrain.losses.chunked_ce import chunked_token_logprobs
from posttrain.losses.common import selective_log_softmax
from posttrain.losses.dpo import DPO_LOSSES, PreferenceLogps
from posttrain.losses.types import LossOutput
from posttrain.models.lm_head import configure, final_hidden, head_function, plan_of
from posttrain.models.loading import apply_lora

REFERENCE_FREE = ("simpo", "orpo")  # no reference model is loaded for these


@dataclass
class DPOConfig:
    loss_type: Literal["sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo"] = "sigmoid"
    """Which preference loss (spec sections 5 and 14, docs/algorithms.md)."""
    beta: PositiveFloat = 0.1
    """Inverse temperature β of the implicit reward (for orpo: λ, the odds-ratio weight)."""
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0
    """ε of cdpo and robust: the assumed fraction of flipped labels (robust: < 0.5)."""
    gamma: NonNegativeFloat = 0.5
    """SimPO target reward margin γ."""
    precompute_ref_logps: bool = False
    """Compute reference log-probs once before training; no reference forward while training."""
    reference: str = ""
    """Reference checkpoint; empty means the starting policy (or the adapter-disabled base with LoRA)."""


@dataclass
class DPORecipe(BaseRecipe):
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Preference-optimisation settings."""


def completion_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of every row, and their counts: (2B,), (2B,)."""
    if isinstance(batch, PackedPreferenceBatch):
        return packed_completion_logps(model, batch)
    plan = plan_of(model)
    if plan is not None:  # chunked LM head (models/lm_head.py): completion positions only
        hidden = final_hidden(model, batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.labels != -100  # (2B, T)
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        per_token = chunked_token_logprobs(
            hidden[mask], head_function(model, plan), batch.labels[mask], plan.chunk
        )  # (M,)
        sums = per_token.new_zeros(mask.shape[0]).index_add(0, rows, per_token)
        return sums, mask.sum(-1)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    mask = batch.labels != -100  # (2B, T)
    per_token = selective_log_softmax(logits, batch.labels.clamp(min=0))  # (2B, T)
    return (per_token * mask).sum(-1), mask.sum(-1)


def packed_completion_logps(
    model, batch: PackedPreferenceBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums from a prefix-shared packed batch: log-softmax only where a completion
    token is predicted, then summed per sequence."""
    sequences = 2 * batch.num_pairs
    plan = plan_of(model)
    if plan is not None:  # chunked LM head (models/lm_head.py): target positions only
        hidden = final_hidden(
            model,
            batch.input_ids,
            attention_mask=forward_mask(model, batch),
            position_ids=batch.position_ids,
        )
        picked = hidden.reshape(-1, hidden.shape[-1])[batch.target_index]  # (N, H)
        per_token = chunked_token_logprobs(
            picked, head_function(model, plan), batch.target_ids, plan.chunk
        )  # (N,)
        sums = per_token.new_zeros(sequences).index_add(0, batch.target_seq, per_token)
        return sums, torch.bincount(batch.target_seq, minlength=sequences)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=forward_mask(model, batch),
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    picked = logits.reshape(-1, logits.shape[-1])[batch.target_index]  # (N, V)
    per_token = selective_log_softmax(picked[None], batch.target_ids[None])[0]  # (N,)
    sums = per_token.new_zeros(sequences).index_add(0, batch.target_seq, per_token)
    return sums, torch.bincount(batch.target_seq, minlength=sequences)


class DPO(OfflineAlgorithm):
    name = "dpo"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg = self.cfg
        self.tokenizer = self.load_tokenizer()
        model = self.load_model()
        check_packing_supported(cfg, model, accelerator.print)
        if cfg.model.lora.r > 0:
            model = apply_lora(model, cfg.model.lora)
        configure(model, cfg.model.logit_chunk_tokens)
        options = MapOptions.from_config(cfg, accelerator)
        sources = train_sources(cfg.data)
        self.train_data = encode_preference_file(
            self.tokenizer, sources, cfg.data.max_length, options=options
        )
        self.train_examples = self.train_data.examples
        log_data(accelerator, "dpo", describe(sources), self.train_data, cfg.data.max_length)
        self.eval_examples = []
        held_out = eval_source(cfg.data)
        if held_out is not None:
            self.eval_examples = encode_preference_file(
                self.tokenizer,
                held_out,
                cfg.data.max_length,
                limit=cfg.data.max_eval_examples,
                options=options,
            ).examples
        self.ref_forward_passes = 0
        self.reference = None
        self.needs_reference = cfg.dpo.loss_type not in REFERENCE_FREE
        if self.needs_reference:
            # Placed like the policy will be: sharded under FSDP2/ZeRO-3, replicated otherwise.
            self.reference = load_reference(cfg.model, cfg.dpo.reference, model, accelerator)
        if self.needs_reference and cfg.dpo.precompute_ref_logps:
            model.to(accelerator.device)
            for examples in (self.train_examples, self.eval_examples):
                self.precompute_reference(model, accelerator, examples)
            self.precompute_passes = self.ref_forward_passes
            self.ref_forward_passes = 0
            self.reference = None  # no reference weights kept once the log-probs are cached
        self.init_sampler(accelerator)
        return model

    def collate(self, examples):
        return collate_pairs(examples, self.tokenizer.pad_token_id, self.cfg.data)

    def num_units(self, batch) -> int:
        return batch.num_pairs

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        """(2B,) reference log-probs: frozen copy, or the policy with its adapter disabled."""
        self.ref_forward_passes += 1
        if self.reference is not None:
            return completion_logps(self.reference, batch)[0]
        unwrapped = model.module if hasattr(model, "module") else model
        with unwrapped.disable_adapter():
            return completion_logps(model, batch)[0]

    @torch.no_grad()
    def precompute_reference(self, model, accelerator: Accelerator, examples: list) -> None:
        """Fill every example's reference log-probs, each process doing its shard."""
        mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
        size = max(self.cfg.train.batch_size, 1)
        results = []
        was_training = model.training
        model.eval()
        # The same number of forwards on every process (a sharded reference's forward is a
        # collective); a process out of rows repeats a batch and drops its results.
        for start in process_batches(len(mine), size, accelerator):
            idx = mine[start : start + size]
            rows = idx or (mine or list(range(len(examples))))[:size]
            batch = self.collate([examples[i] for i in rows]).to(accelerator.device)
            with accelerator.autocast():
                ref = self.reference_logps(model, batch).float().cpu()
            pairs = len(idx)
            results.extend(zip(idx, ref[:pairs].tolist(), ref[pairs:].tolist()))
        model.train(was_training)
        for i, chosen, rejected in gather_object(results):
            examples[i].ref_chosen, examples[i].ref_rejected = chosen, rejected

    def preference_logps(self, model, batch) -> PreferenceLogps:
        logps, lengths = completion_logps(model, batch)
        b = batch.num_pairs
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            if batch.ref_logps is not None:
                ref_chosen, ref_rejected = batch.ref_logps[:, 0], batch.ref_logps[:, 1]
            else:
                ref = self.reference_logps(model, batch)
                ref_chosen, ref_rejected = ref[:b], ref[b:]
        return PreferenceLogps(
            logps[:b], logps[b:], ref_chosen, ref_rejected, lengths[:b], lengths[b:]
        )

    def compute_loss(self, model, batch) -> LossOutput:
        d = self.cfg.dpo
        out = DPO_LOSSES[d.loss_type](
            self.preference_logps(model, batch), d.beta, d.label_smoothing, d.gamma
        )
        out.metrics["ref_forward_passes"] = torch.tensor(float(self.ref_forward_passes))
        return out

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        model.eval()
        d = self.cfg.dpo
        totals = torch.zeros(3, device=accelerator.device)  # loss sum, pairs, accuracy sum
        passes = self.ref_forward_passes  # evaluation's reference passes are not training's
        for batch, weight in self.eval_batches(self.eval_examples, accelerator):
            with accelerator.autocast():
                out = DPO_LOSSES[d.loss_type](
                    self.preference_logps(model, batch), d.beta, d.label_smoothing, d.gamma
                )
            totals += weight * torch.stack(
                [
                    out.total.float(),
                    out.units.float(),
                    out.metrics["rewards_accuracy"].float() * out.units.float(),
                ]
            )
        self.ref_forward_passes = passes
        totals = accelerator.reduce(totals, reduction="sum")
        model.train()
        pairs = max(float(totals[1]), 1.0)
        return {"loss": float(totals[0]) / pairs, "rewards_accuracy": float(totals[2]) / pairs}
