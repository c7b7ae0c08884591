"""`final/`: the trained model as a plain Hugging Face checkpoint, written atomically.

Under sharding (FSDP2, DeepSpeed ZeRO) every rank joins in gathering full state dicts
(Accelerate's `get_state_dict`, a collective) before the main process writes; a rank-0-only
save of a sharded model would deadlock or write shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from posttrain.algorithms.base import Algorithm, Trainable
from posttrain.config import BaseRecipe, save_config
from posttrain.models.moe import MoEObjective
from posttrain.train import checkpoint as ckpt


def save_final(
    accelerator: Accelerator,
    cfg: BaseRecipe,
    algorithm: Algorithm,
    trained: list[Trainable],
    moe: MoEObjective | None,
    step: int,
) -> Path:
    """`final/` as a plain Hugging Face checkpoint, written atomically. Sharded models are
    gathered into full state dicts first, a collective every rank joins."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dicts = {
        t.name: accelerator.get_state_dict(t.module) if sharded else None for t in trained
    }
    policy = accelerator.unwrap_model(trained[0].module)
    if state_dicts["model"] is not None:
        state_dicts["model"] = without_tied_duplicates(policy, state_dicts["model"])

    def write(path: Path) -> None:
        algorithm.save_final(policy, path, state_dicts)
        if moe is not None:
            moe.save(path)
        save_config(cfg, path / "posttrain_config.yaml")

    return ckpt.save_final(accelerator, cfg.train.output_dir, step, write)


def without_tied_duplicates(model: torch.nn.Module, state_dict: dict) -> dict:
    """Drop the second name of a tied parameter (lm_head sharing the embedding) from a gathered
    state dict, as save_pretrained does from a live model: the checkpoint then matches one saved
    without sharding."""
    seen: dict[int, str] = {}
    drop = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            drop.add(name)
        else:
            seen[id(param)] = name
    return {k: v for k, v in state_dict.items() if k not in drop}
