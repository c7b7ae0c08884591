"""Mixture-of-experts router training for every trainer, through the one loop (spec §10).

Any Hugging Face MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) declares its router
modules in `_can_record_outputs["router_logits"]`: transformers 5 records router logits with
forward hooks on those modules. `MoEObjective` hooks the same modules itself instead of setting
`config.output_router_logits`, because
- it works for every head (causal LM, sequence classification for `rm`, token classification
  for the PPO critic) and through peft / DDP wrappers, none of which need to return the logits;
- only the forwards run inside `capture()` with grad enabled count (the loop wraps
  `algorithm.compute_loss`): generation (inference mode), π_old / reference passes (no_grad),
  evaluation and the recomputation of gradient checkpointing never add a loss or a metric;
- the model never computes its own aux loss on the side (posttrain passes no labels either, so
  the model's forward would not have added it to a loss anyway).

Per micro-batch the loop adds (aux_loss_coef · L_aux + z_loss_coef · L_z) · units to the
micro-batch's summed loss, so after the loop's division by the global unit count the step's
loss carries the unit-weighted mean of the micro-batches' router losses. L_aux is the model's own
`load_balancing_loss_func` (its modelling module's; HF pools all layers and its value at perfect
balance is top_k) or, with `aux_loss_impl: posttrain` / when the model has none,
`losses.moe.load_balancing_loss` (per layer, 1 at balance). With several trained models (PPO's
policy and critic) the per-model losses are summed.

Aux-loss-free balancing (DeepSeek-V3 §2.1.2): a per-router, per-expert bias b is added to the
router probabilities for the top-k choice only; the gate weights stay the unbiased
probabilities. Deviation: DeepSeek-V3 biases sigmoid affinities; the HF routers here use softmax,
so b is in probability units. After every optimizer step b_i moves by ±γ toward equal load
(loads summed over the step's micro-batches and all processes, so every process keeps the same
b). b is checkpointed with the run and written to `final/moe_selection_bias.json`; a plain
transformers load of the final model does not apply it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import ConfigError, MoEConfig
from posttrain.losses.moe import (
    aux_free_bias_update,
    load_balancing_loss,
    load_stats,
    router_entropy,
    router_z_loss,
)
from posttrain.losses.types import LossOutput


@dataclass
class RouterSlot:
    """One router (one MoE layer) of one trained model."""

    name: str  # module path inside its model, e.g. "model.layers.0.mlp.gate"
    module: nn.Module
    root: int  # which trained model (0: the policy; PPO: 1 is the critic)
    num_experts: int
    top_k: int
    logits_index: int  # position of the router logits in the module's output tuple


@dataclass
class _Forward:
    """Router outputs of one grad-enabled forward of one trained model."""

    root: int
    attention_mask: torch.Tensor | None  # (B, T) as passed to the model, or None
    logits: list[torch.Tensor] = field(default_factory=list)  # per layer (tokens, E)
    chosen: list[torch.Tensor] = field(default_factory=list)  # per layer (tokens, k) experts

    def token_mask(self) -> torch.Tensor | None:
        """(tokens,) real-token mask matching the routers' flattened rows, or None."""
        mask = self.attention_mask
        if mask is None or mask.numel() != self.logits[0].shape[0]:
            return None  # e.g. packed rows without a mask: every row is a token
        return mask.reshape(-1).bool()


def _recorders(model: nn.Module) -> list:
    specs = (getattr(type(model), "_can_record_outputs", None) or {}).get("router_logits")
    if specs is None:
        return []
    return specs if isinstance(specs, list) else [specs]


def _router_modules(root: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, logits index) of the routers that `root` declares for router_logits."""
    found = []
    for spec in _recorders(root):
        target = getattr(spec, "target_class", None)
        if target is None:  # a bare class name string: transformers' multimodal fallback
            continue
        layer = getattr(spec, "layer_name", None)
        for name, module in root.named_modules():
            if isinstance(module, target) and (
                layer is None or f".{layer.strip('.')}." in f".{name}."
            ):
                found.append((name, module, getattr(spec, "index", 0)))
    return found


def find_routers(models: list[nn.Module]) -> tuple[list[RouterSlot], list[nn.Module]]:
    """Router slots of every MoE model inside `models` (through peft / DDP wrappers), and the
    outermost Hugging Face model ("root") of each trained model that has routers."""
    from transformers import PreTrainedModel

    slots: list[RouterSlot] = []
    roots: list[nn.Module] = []
    seen: set[int] = set()
    for model in models:
        for module in model.modules():  # pre-order: outer models come first
            if not isinstance(module, PreTrainedModel) or id(module) in seen:
                continue
            routers = [r for r in _router_modules(module) if id(r[1]) not in seen]
            if not routers:
                continue
            config = module.config.get_text_config()
            for name, router, index in routers:
                seen.add(id(router))
                experts = getattr(router, "num_experts", None) or getattr(
                    config, "num_experts", None
                )
                experts = experts or getattr(config, "num_local_experts", None)
                top_k = getattr(router, "top_k", None) or getattr(
                    config, "num_experts_per_tok", None
                )
                if not experts or not top_k:
                    raise ConfigError(
                        f"{type(router).__name__}: cannot tell the number of experts / top-k "
                        "from the router or the model config"
                    )
                slots.append(RouterSlot(name, router, len(roots), int(experts), int(top_k), index))
            seen.update(id(m) for m in module.modules())  # inner models share these routers
            roots.append(module)
    return slots, roots


def freeze_routers(model: nn.Module) -> int:
    """requires_grad=False on every router parameter; returns how many tensors were frozen."""
    slots, _ = find_routers([model])
    frozen = 0
    for slot in slots:
        for param in slot.module.parameters():
            param.requires_grad_(False)
            frozen += 1
    return frozen


class MoEObjective:
    """Router losses, metrics and aux-free balancing for the trained MoE models of one run."""

    def __init__(self, slots: list[RouterSlot], roots: list[nn.Module], cfg: MoEConfig):
        self.cfg, self.slots, self.roots = cfg, slots, roots
        # The architecture's own Switch loss lives next to its model class.
        self.model_aux = [
            getattr(sys.modules[type(root).__module__], "load_balancing_loss_func", None)
            for root in roots
        ]
        self.bias: list[torch.Tensor] | None = None
        self._step_counts: list[torch.Tensor] | None = None
        self._normalise: dict[int, bool] = {}
        if cfg.aux_free_bias_gamma > 0:
            self._check_bias_support()
            device = next(roots[0].parameters()).device
            self.bias = [torch.zeros(s.num_experts, device=device) for s in slots]  # (E,) each
            self._step_counts = [torch.zeros_like(b) for b in self.bias]
        self._layers = [sum(s.root == r for s in slots) for r in range(len(roots))]
        self._armed = False
        self._forwards: list[_Forward] = []
        self._open: dict[int, _Forward] = {}
        self._handles = [
            root.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
            for i, root in enumerate(roots)
        ]
        self._handles += [
            slot.module.register_forward_hook(self._router_hook(i)) for i, slot in enumerate(slots)
        ]

    @classmethod
    def build(cls, models: list[nn.Module], cfg: MoEConfig) -> MoEObjective | None:
        """The objective for the MoE models among `models`, or None when none is MoE."""
        slots, roots = find_routers(models)
        return cls(slots, roots, cfg) if slots else None

    def _check_bias_support(self) -> None:
        for slot in self.slots:
            if slot.logits_index != 0 or hasattr(slot.module, "e_score_correction_bias"):
                raise ConfigError(
                    f"model.moe.aux_free_bias_gamma: {type(slot.module).__name__} is not a plain "
                    "top-k softmax router returning (logits, weights, experts) (a model with its "
                    "own e_score_correction_bias already balances without an aux loss)"
                )

    # ---- hooks ------------------------------------------------------------------------------

    def _pre_hook(self, root: int):
        def hook(module, args, kwargs):
            if self._armed and torch.is_grad_enabled():
                mask = kwargs.get("attention_mask")
                mask = mask.detach() if torch.is_tensor(mask) and mask.dim() == 2 else None
                self._open[root] = _Forward(root, mask)
                self._forwards.append(self._open[root])

        return hook

    def _router_hook(self, index: int):
        slot = self.slots[index]

        def hook(module, args, output):
            replaced = self._biased_routing(index, output) if self.bias is not None else None
            output = replaced if replaced is not None else output
            if self._armed and torch.is_grad_enabled():
                self._record(slot, index, output)
            return replaced

        return hook

    def _biased_routing(self, index: int, output) -> tuple:
        """The router's (logits, weights, experts) with the experts chosen on probs + bias."""
        if not (
            isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point()
        ):
            raise RuntimeError(
                f"{type(self.slots[index].module).__name__} does not return (logits, weights, "
                "experts): model.moe.aux_free_bias_gamma cannot patch it"
            )
        logits, weights, _ = output  # (tokens, E), (tokens, k), (tokens, k)
        probs = logits.float().softmax(dim=-1)  # (tokens, E)
        chosen = (probs + self.bias[index]).topk(self.slots[index].top_k, dim=-1).indices
        picked = probs.gather(-1, chosen)  # (tokens, k) unbiased gate weights
        if self._normalises(index, weights):
            picked = picked / picked.sum(dim=-1, keepdim=True)
        return logits, picked.to(weights.dtype), chosen

    def _normalises(self, index: int, weights: torch.Tensor) -> bool:
        if index not in self._normalise:
            flag = getattr(self.slots[index].module, "norm_topk_prob", None)
            if flag is None:  # e.g. Mixtral always renormalises: read it off the output once
                sums = weights.float().sum(-1)  # (tokens,)
                flag = bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
            self._normalise[index] = bool(flag)
        return self._normalise[index]

    def _record(self, slot: RouterSlot, index: int, output) -> None:
        forward = self._open.get(slot.root)
        if forward is None or len(forward.logits) == self._layers[slot.root]:
            # Routers reached without the model's own forward (e.g. a caller running the inner
            # decoder directly): one record per pass through all layers, no padding mask.
            self._open[slot.root] = _Forward(slot.root, None)
            self._forwards.append(self._open[slot.root])
        forward = self._open[slot.root]
        logits = output[slot.logits_index] if isinstance(output, tuple) else output
        if isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point():
            chosen = output[2]  # the experts the layer really used (bias included)
        else:
            chosen = logits.detach().topk(slot.top_k, dim=-1).indices
        forward.logits.append(logits)
        forward.chosen.append(chosen.detach())
        if self._step_counts is not None:
            mask = forward.token_mask()
            self._step_counts[index] += _expert_counts(chosen, slot.num_experts, mask)

    # ---- the loop's interface -----------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self):
        """Record the router outputs of the grad-enabled forwards run inside this block."""
        self._forwards, self._open, self._armed = [], {}, True
        try:
            yield
        finally:
            self._armed, self._open = False, {}

    def add_to_loss(self, output: LossOutput, units: float) -> LossOutput:
        """`output` plus the router losses of the captured forwards, weighted by `units` (the
        micro-batch's loss units: the loop divides the summed loss by the global count)."""
        forwards, self._forwards = [f for f in self._forwards if f.logits], []
        if not forwards:
            return output
        cfg = self.cfg
        by_root: dict[int, list[_Forward]] = defaultdict(list)
        for f in forwards:
            by_root[f.root].append(f)
        with torch.set_grad_enabled(cfg.aux_loss_coef != 0 and torch.is_grad_enabled()):
            aux = sum(torch.stack([self.aux_loss(f) for f in fs]).mean() for fs in by_root.values())
        with torch.set_grad_enabled(cfg.z_loss_coef != 0 and torch.is_grad_enabled()):
            z = sum(
                torch.stack([router_z_loss(f.logits, f.token_mask()) for f in fs]).mean()
                for fs in by_root.values()
            )
        total = output.total
        if cfg.aux_loss_coef != 0:
            total = total + cfg.aux_loss_coef * aux * units
        if cfg.z_loss_coef != 0:
            total = total + cfg.z_loss_coef * z * units
        metrics = {
            **output.metrics,
            "moe/aux_loss": aux.detach(),
            "moe/z_loss": z.detach(),
            **self.load_metrics(forwards),
        }
        return output._replace(total=total, metrics=metrics)

    def aux_loss(self, forward: _Forward) -> torch.Tensor:
        """Load-balancing loss of one forward, α not applied (scalar)."""
        slot = next(s for s in self.slots if s.root == forward.root)
        model_fn = self.model_aux[forward.root]
        mask = forward.token_mask()
        if self.cfg.aux_loss_impl == "model" and model_fn is not None:
            attention_mask = forward.attention_mask if mask is not None else None
            logits = tuple(layer.float() for layer in forward.logits)  # HF needs a tuple
            return model_fn(logits, slot.num_experts, slot.top_k, attention_mask)
        return load_balancing_loss(forward.logits, slot.num_experts, slot.top_k, mask)

    @torch.no_grad()
    def load_metrics(self, forwards: list[_Forward]) -> dict[str, torch.Tensor]:
        """Per-layer expert load (share of token slots) summarised over layers and forwards:
        mean coefficient of variation, smallest and largest share, mean router entropy."""
        cvs, lows, highs, entropies = [], [], [], []
        for f in forwards:
            mask = f.token_mask()
            slots = [s for s in self.slots if s.root == f.root]
            for slot, logits, chosen in zip(slots, f.logits, f.chosen):
                counts = _expert_counts(chosen, slot.num_experts, mask)  # (E,)
                stats = load_stats(counts / counts.sum().clamp(min=1))
                cvs.append(stats["cv"])
                lows.append(stats["min"])
                highs.append(stats["max"])
                entropies.append(router_entropy(logits, mask))
        return {
            "moe/load_cv": torch.stack(cvs).mean(),
            "moe/load_min": torch.stack(lows).min(),
            "moe/load_max": torch.stack(highs).max(),
            "moe/router_entropy": torch.stack(entropies).mean(),
        }

    def on_step_end(self, accelerator) -> dict:
        """After the optimizer step: move the selection biases toward equal load."""
        if self.bias is None:
            return {}
        counts = torch.stack(self._step_counts)  # (layers, E) this process
        counts = accelerator.reduce(counts, reduction="sum") if accelerator else counts
        for i, layer_counts in enumerate(counts):
            if layer_counts.sum() > 0:
                load = layer_counts / layer_counts.sum()  # (E,)
                self.bias[i] = aux_free_bias_update(
                    self.bias[i], load, self.cfg.aux_free_bias_gamma
                )
            self._step_counts[i].zero_()
        spread = torch.stack([b.max() - b.min() for b in self.bias]).max()
        return {"moe/bias_spread": float(spread)}

    # ---- checkpoints and the final model ----------------------------------------------------

    def state_dict(self) -> dict:
        return {"bias": [b.cpu() for b in self.bias] if self.bias is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.bias is not None and state.get("bias") is not None:
            self.bias = [b.to(old.device) for b, old in zip(state["bias"], self.bias)]

    def save(self, path: Path) -> None:
        """Write the policy's selection biases (aux-free balancing only) next to the model."""
        if self.bias is None:
            return
        routers = {s.name: b.tolist() for s, b in zip(self.slots, self.bias) if s.root == 0}
        record = {"aux_free_bias_gamma": self.cfg.aux_free_bias_gamma, "routers": routers}
        (Path(path) / "moe_selection_bias.json").write_text(json.dumps(record, indent=1))

    def close(self) -> None:
        """Remove every hook (the model behaves as loaded again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _expert_counts(chosen: torch.Tensor, num_experts: int, mask: torch.Tensor | None):
    """(E,) float how many kept tokens chose each expert, from (tokens, k) expert indices."""
    counts = F.one_hot(chosen.detach(), num_experts).sum(dim=1).float()  # (tokens, E)
    if mask is not None:
        counts = counts * mask.to(counts.device).unsqueeze(1)
    return counts.sum(dim=0)
