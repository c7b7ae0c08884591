"""Parameter, gradient and optimizer-state bytes each rank really holds (local shards under
FSDP2/ZeRO), recorded in train_summary.json to show what sharding saves."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import Trainable
from posttrain.models.sharding import full_parameter_bytes, local_parameter_bytes
from posttrain.train.distributed import sharding_of


def parameter_summary(accelerator: Accelerator, trained: list[Trainable], grad_bytes: int) -> dict:
    """What runs and how much parameter, gradient and optimizer-state memory each rank really
    holds (largest over ranks; gradients as measured after the first step's backward)."""
    local = [
        sum(local_parameter_bytes(t.module) for t in trained),
        sum(optimizer_state_bytes(t.optimizer) for t in trained),
        grad_bytes,
    ]
    per_rank = torch.tensor([float(x) for x in local], device=accelerator.device)[None]
    if accelerator.num_processes > 1:
        per_rank = accelerator.gather(per_rank)  # (world, 3)
    largest = per_rank.max(dim=0).values
    return {
        "sharding": sharding_of(accelerator),
        "param_bytes_per_rank": int(largest[0]),
        "optimizer_bytes_per_rank": int(largest[1]),
        "grad_bytes_per_rank": int(largest[2]),
        "param_bytes_total": sum(full_parameter_bytes(t.module) for t in trained),
    }


def gradient_bytes(module: torch.nn.Module) -> int:
    """Bytes of gradients this rank holds (local shards under FSDP2)."""
    total = 0
    for p in module.parameters():
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (AdamW moments) this rank holds: local shards under FSDP2."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:  # skip the scalar step counts
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total
