"""Supervised fine-tuning (spec section 3): cross-entropy on assistant/completion tokens only,
normalised by the number of target tokens in the global batch, optionally padding-free packed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import OfflineAlgorithm
from posttrain.config import BaseRecipe
from posttrain.data.batches import SFTBatch
from posttrain.data.collate import pack_collate, pad_collate
from posttrain.data.encoding import EncodedExample
from posttrain.data.encoding import encode_sft_file as encode_sft_file  # re-exported
from posttrain.data.sources import describe, eval_source, train_sources
from posttrain.data.tokenized import MapOptions
from posttrain.losses.chunked_ce import chunked_cross_entropy
from posttrain.losses.mtp import mtp_loss
from posttrain.losses.sft import cross_entropy_loss
from posttrain.losses.types import LossOutput
from posttrain.models.attention_support import (
    block_mask_from_positions,
    fast_path,
    model_mask,
    profile,
    sft_packing,
)
from posttrain.models.lm_head import (
    configure,
    final_hidden,
    head_function,
    head_parameters,
    plan_of,
)
from posttrain.models.loading import apply_lora
from posttrain.models.mtp import MTPCausalLM, build_heads, save_heads


@dataclass
class SFTRecipe(BaseRecipe):
    """SFT has no section of its own: model, data, optim, train, logging."""


def forward_logits(model, batch) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits  # (B, T, V)


def chunked_loss(model, batch, plan) -> LossOutput:
    """`cross_entropy_loss` through the chunked LM head (models/lm_head.py): the head runs on
    the labelled positions only, a chunk at a time, so no (B, T, V) logits exist."""
    hidden = final_hidden(
        model,
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )  # (B, T, H)
    valid = batch.labels != -100  # (B, T)
    head = head_function(model, plan)
    total, units, correct = chunked_cross_entropy(
        hidden[valid], head, batch.labels[valid], plan.chunk, params=head_parameters(model)
    )
    return LossOutput(total, units, {"token_accuracy": correct.float() / units.clamp(min=1)})


def mtp_losses(model, batch, weight: float) -> tuple[LossOutput, LossOutput]:
    """Main cross-entropy and the MTP loss (spec section 11) of an `MTPCausalLM`."""
    logits, head_logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    main = cross_entropy_loss(logits, batch.labels)
    return main, mtp_loss(head_logits, batch.labels, weight, position_ids=batch.position_ids)


def _mtp_metrics(main: LossOutput, extra: LossOutput) -> dict[str, torch.Tensor]:
    """Per-depth metrics, 1-based as in the paper: mtp/loss_1 ... mtp/acc_K."""
    metrics = {"main_loss": main.total.detach() / main.units.clamp(min=1), **main.metrics}
    for key, value in extra.metrics.items():
        name, k = key.rsplit("_", 1)  # mtp_loss_0 -> mtp/loss_1
        metrics[f"mtp/{name.removeprefix('mtp_')}_{int(k) + 1}"] = value
    return metrics


def collate_sft(examples, pad_id: int, row_length: int, pack_mode: str, attention) -> SFTBatch:
    """Padded rows, or packed rows (pack_mode from attention_support.sft_packing) with the
    explicit block mask a model that ignores restarting position_ids needs."""
    if pack_mode == "padded":
        return pad_collate(examples, pad_id)
    batch = pack_collate(examples, pad_id, row_length)
    if pack_mode == "block_mask":
        allowed = block_mask_from_positions(batch.position_ids)
        mask = model_mask(attention, allowed, batch.position_ids)
        batch = dataclasses.replace(batch, attention_mask=mask)
    return batch


class SFT(OfflineAlgorithm):
    name = "sft"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg = self.cfg
        self.tokenizer = self.load_tokenizer()
        model = self.load_model()
        # Padding-free rows need the model to mask them (attention_support.sft_packing).
        self.attention = profile(model)
        if cfg.data.packing:
            fast_path(model, "sft_packing", accelerator.print)
        if cfg.model.lora.r > 0:
            model = apply_lora(model, cfg.model.lora)
        if cfg.model.mtp.kind == "none":  # MTP heads read the full logits of every position
            configure(model, cfg.model.logit_chunk_tokens)
        if cfg.model.mtp.kind != "none":
            if cfg.model.mtp.freeze_base:
                model.requires_grad_(False)
            heads = build_heads(model, cfg.model.mtp, cfg.model.name_or_path)
            model = MTPCausalLM(model, heads)
        options = MapOptions.from_config(cfg, accelerator)
        sources = train_sources(cfg.data)
        self.train_data = encode_sft_file(
            self.tokenizer,
            sources,
            cfg.data.format,
            cfg.data.max_length,
            side=cfg.data.truncation_side,
            options=options,
        )
        self.eval_data = None
        held_out = eval_source(cfg.data)
        if held_out is not None:
            self.eval_data = encode_sft_file(
                self.tokenizer,
                held_out,
                cfg.data.format,
                cfg.data.max_length,
                limit=cfg.data.max_eval_examples,
                side=cfg.data.truncation_side,
                options=options,
            )
        self.train_examples = self.train_data.examples
        self.init_sampler(accelerator)
        if accelerator.is_main_process:
            d = self.train_data
            accelerator.print(
                f"sft data: {len(d.examples)} examples from {describe(sources)} "
                f"({d.truncated} truncated to max_length={cfg.data.max_length}, {d.skipped} skipped)"
            )
        return model

    def collate(self, examples: list[EncodedExample]):
        mode = sft_packing(self.attention)[0] if self.cfg.data.packing else "padded"
        pad_id, row_length = self.tokenizer.pad_token_id, self.cfg.data.max_length
        return collate_sft(examples, pad_id, row_length, mode, self.attention)

    def num_units(self, batch) -> int:
        return batch.num_loss_tokens

    def compute_loss(self, model, batch) -> LossOutput:
        if self.cfg.model.mtp.kind == "none":
            plan = plan_of(model)
            if plan is not None:
                return chunked_loss(model, batch, plan)
            return cross_entropy_loss(forward_logits(model, batch), batch.labels)
        main, extra = mtp_losses(model, batch, self.cfg.model.mtp.weight)
        # L_MTP is a per-micro-batch mean; weighting it by this micro-batch's tokens makes the
        # loop's division by the global token count give CE + token-weighted mean of L_MTP
        total = main.total + extra.total * main.units
        return LossOutput(total, main.units, _mtp_metrics(main, extra))

    def save_final(self, model, path, state_dicts) -> None:
        if not isinstance(model, MTPCausalLM):
            return super().save_final(model, path, state_dicts)
        # the heads go beside the checkpoint, so from_pretrained(path) sees a plain model
        full = state_dicts.get("model")
        base = heads = None
        if full is not None:  # gathered from shards: split "base.*" / "heads.*"
            base = {k[len("base.") :]: v for k, v in full.items() if k.startswith("base.")}
            heads = {k[len("heads.") :]: v for k, v in full.items() if k.startswith("heads.")}
        super().save_final(model.base, path, {"model": base})
        save_heads(model.heads, self.cfg.model.mtp, path, state_dict=heads)

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        model.eval()
        depth = self.cfg.model.mtp.depth if self.cfg.model.mtp.kind != "none" else 0
        # loss sum, units, correct tokens, then each head's accuracy weighted by units
        totals = torch.zeros(3 + depth, device=accelerator.device)
        for batch, weight in self.eval_batches(self.eval_data.examples, accelerator):
            with accelerator.autocast():
                if depth:
                    out, extra = mtp_losses(model, batch, self.cfg.model.mtp.weight)
                    heads = [extra.metrics[f"mtp_acc_{k}"].float() for k in range(depth)]
                else:
                    out, heads = self.compute_loss(model, batch), []
            units = out.units.float()
            totals += weight * torch.stack(
                [out.total.float(), units, out.metrics["token_accuracy"].float() * units]
                + [acc * units for acc in heads]
            )
        totals = accelerator.reduce(totals, reduction="sum")
        model.train()
        units = max(float(totals[1]), 1.0)
        result = {"loss": float(totals[0]) / units, "token_accuracy": float(totals[2]) / units}
        result.update({f"mtp/acc_{k + 1}": float(totals[3 + k]) / units for k in range(depth)})
        return result
