"""`final/`: the trained model as a plain Hugging Face checkpoint, written atomically.

Under sharding (FSDP2, DeepSpeed ZeRO) every rank joins in gathering full state dicts
(Accelerate's `get_state_dict`, a collective) before the main process writes; a rank-0-only
save of a sharded model would deadlock or write shards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from posttrain.algorithms.base import Algorithm, Trainable
from posttrain.config import BaseRecipe, save_config
from posttrain.models.moe import MoEObjective
from posttrain.train import checkpoint as ckpt
from posttrain.train.hub import push_final
from posttrain.train.model_card import model_card


def save_final(
    accelerator: Accelerator,
    cfg: BaseRecipe,
    algorithm: Algorithm,
    trained: list[Trainable],
    moe: MoEObjective | None,
    step: int,
    metrics: dict | None = None,
) -> Path:
    """`final/` as a plain Hugging Face checkpoint with a model card (README.md), written
    atomically, then pushed to the Hub with `train.push_to_hub`. Sharded models are gathered
    into full state dicts first, a collective every rank joins."""
    write_model = model_writer(accelerator, cfg, algorithm, trained, moe)

    def write(path: Path) -> None:
        write_model(path)
        (path / "README.md").write_text(model_card(cfg, algorithm.name, step, metrics))

    final = ckpt.save_final(accelerator, cfg.train.output_dir, step, write)
    if cfg.train.push_to_hub and accelerator.is_main_process:
        url = push_final(cfg.train, final)
        accelerator.print(f"pushed {final} to {url}")
    accelerator.wait_for_everyone()
    return final


def model_writer(
    accelerator: Accelerator,
    cfg: BaseRecipe,
    algorithm: Algorithm,
    trained: list[Trainable],
    moe: MoEObjective | None,
) -> Callable[[Path], None]:
    """`write(path)` that saves the trained model as a Hugging Face checkpoint into `path` (on
    the main process). Every rank must call this: under sharding it gathers the full state
    dicts now (a collective), so `write` itself runs on the main process alone."""
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

    return write


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
