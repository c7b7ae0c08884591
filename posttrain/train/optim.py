"""AdamW with decay/no-decay parameter groups and a warm-up + decay schedule (spec section 1).

torch.optim.AdamW does the update (fused or foreach where the device allows); the schedule
comes from transformers. Nothing here re-implements either.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

from posttrain.config import OptimConfig


def parameter_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight matrices decay; biases, norm weights (1-D tensors) and, unless asked, embeddings don't."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied weights appear once
        is_embedding = id(param) in embedding_params
        if param.ndim < 2 or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    groups = parameter_groups(model, cfg)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # The fused kernel exists for CUDA (and CPU in recent torch); foreach is the fallback.
    if cfg.fused and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(groups, **kwargs)
    except (RuntimeError, TypeError):
        kwargs.pop("fused", None)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.scheduler
    ]
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(total_steps, 1)
    )
