"""KTO (spec §14; Ethayarajh et al. 2024): unpaired desirable / undesirable rows.

Each micro-batch of B rows goes through one forward pass together with B mismatched rows (row
i's prompt with row i-1's completion), whose policy-minus-reference log-ratio estimates the
reference point z_ref (no gradient; averaged over every process). The reference is a frozen
copy of the starting policy (or `kto.reference`), or with LoRA the policy with its adapter
disabled. One loss unit per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import OfflineAlgorithm
from posttrain.algorithms.dpo import completion_logps
from posttrain.algorithms.rl_common import load_reference
from posttrain.config import (
    BaseRecipe,
    ConfigError,
    NonNegativeFloat,
    PositiveFloat,
    reject_unused,
)
from posttrain.data.kto import KTOBatch, encode_kto_file, kto_collate
from posttrain.data.sources import describe, eval_source, train_sources
from posttrain.data.tokenized import MapOptions
from posttrain.losses.kto import kto_loss
from posttrain.losses.types import LossOutput
from posttrain.models.lm_head import configure
from posttrain.models.loading import apply_lora


@dataclass
class KTOConfig:
    beta: PositiveFloat = 0.1
    """β: scale of the implicit reward log π - log π_ref."""
    desirable_weight: NonNegativeFloat = 1.0
    """λ_D: weight of desirable rows (raise it when they are the minority)."""
    undesirable_weight: NonNegativeFloat = 1.0
    """λ_U: weight of undesirable rows."""
    reference: str = ""
    """Reference checkpoint; empty means the starting policy (or the adapter-disabled base with LoRA)."""


@dataclass
class KTORecipe(BaseRecipe):
    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO settings."""


class KTO(OfflineAlgorithm):
    name = "kto"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.train.batch_size < 2:
            raise ConfigError(
                "kto needs train.batch_size >= 2: the reference KL is estimated by pairing each "
                "prompt with another row's completion in the same micro-batch"
            )
        reject_unused(
            cfg,
            "kto",
            {
                "data.format": "kto rows always have prompt, completion and label columns",
                "data.packing": "each micro-batch pairs its rows with mismatched completions",
                "data.truncation_side": "over-long rows keep their first tokens (sft only)",
            },
        )
        self.accelerator = accelerator
        self.tokenizer = self.load_tokenizer()
        model = self.load_model()
        if cfg.model.lora.r > 0:
            model = apply_lora(model, cfg.model.lora)
        configure(model, cfg.model.logit_chunk_tokens)
        options = MapOptions.from_config(cfg, accelerator)
        sources = train_sources(cfg.data)
        data = encode_kto_file(self.tokenizer, sources, cfg.data.max_length, options=options)
        self.train_examples = data.examples
        if accelerator.is_main_process:
            good = sum(e.desirable for e in data.examples)
            accelerator.print(
                f"kto data: {len(data.examples)} rows ({good} desirable) from "
                f"{describe(sources)} ({data.truncated} truncated to max_length="
                f"{cfg.data.max_length}; skipped {data.skipped})"
            )
        self.eval_examples = []
        held_out = eval_source(cfg.data)
        if held_out is not None:
            self.eval_examples = encode_kto_file(
                self.tokenizer,
                held_out,
                cfg.data.max_length,
                limit=cfg.data.max_eval_examples,
                options=options,
            ).examples
        # Placed like the policy will be: sharded under FSDP2/ZeRO-3, replicated otherwise.
        self.reference = load_reference(cfg.model, cfg.kto.reference, model, accelerator)
        self.init_sampler(accelerator)
        return model

    def collate(self, examples) -> KTOBatch:
        return kto_collate(examples, self.tokenizer.pad_token_id)

    def num_units(self, batch: KTOBatch) -> int:
        return batch.num_rows

    @torch.no_grad()
    def reference_logps(self, model, batch: KTOBatch) -> torch.Tensor:
        """(2B,) reference log-probs: frozen copy, or the policy with its adapter disabled."""
        if self.reference is not None:
            return completion_logps(self.reference, batch)[0]
        unwrapped = model.module if hasattr(model, "module") else model
        with unwrapped.disable_adapter():
            return completion_logps(model, batch)[0]

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return x
        return self.accelerator.reduce(x.to(self.accelerator.device), reduction="sum")

    def _loss(self, model, batch: KTOBatch, weight: float = 1.0) -> LossOutput:
        """weight 0.0: a padding batch (evaluation) that must not move the z_ref estimate."""
        k, b = self.cfg.kto, batch.num_rows
        logps = completion_logps(model, batch)[0]  # (2B,)
        ref = self.reference_logps(model, batch)  # (2B,)
        return kto_loss(
            logps[:b],
            ref[:b],
            logps[b:].detach(),
            ref[b:],
            batch.desirable,
            k.beta,
            k.desirable_weight,
            k.undesirable_weight,
            all_reduce=lambda x: self._all_reduce(x * weight),
        )

    def compute_loss(self, model, batch: KTOBatch) -> LossOutput:
        return self._loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        model.eval()
        totals = torch.zeros(2, device=accelerator.device)  # loss sum, rows
        for batch, weight in self.eval_batches(self.eval_examples, accelerator):
            # Every process runs every forward (a sharded model's forward is a collective); a
            # lone row has no mismatched partner, so it runs but does not count.
            weight = weight if batch.num_rows >= 2 else 0.0
            with accelerator.autocast():
                out = self._loss(model, batch, weight)
            totals += weight * torch.stack([out.total.float(), out.units.float()])
        totals = accelerator.reduce(totals, reduction="sum")
        model.train()
        return {"loss": float(totals[0]) / max(float(totals[1]), 1.0)}
