"""What the rest of posttrain needs to know about a sharded model, engine-agnostic.

- `full_parameters(model)`: a context in which every parameter is whole on every rank, so
  the RolloutEngine can run its KV-cache decode loop (whose steps differ in number between
  ranks) without collectives inside it. FSDP2 unshards all its units once per rollout and keeps
  them unsharded until the context ends; ZeRO-3 gathers its partitions; anything else is a
  no-op. Generating once per rollout from gathered weights costs one all-gather of the model
  (memory: the full parameters, like a replicated model) instead of one per layer per token.
- `shard_frozen(accelerator, module)`: a frozen model (DPO/KL reference) placed like the
  trained one: sharded under FSDP2 (no optimizer), a ZeRO-3 inference engine, or just moved.
- `local_parameter_bytes(model)`: the bytes of parameters this rank really holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _fsdp_units(model: torch.nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(_fsdp_units(model)) or _is_zero3(model)


def _is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter unsharded on every rank for the duration (collective: every rank must
    enter). Parameters are read-only inside: nothing here writes them back."""
    if getattr(model, "_posttrain_full_parameters", False):  # nested: already gathered
        yield
        return
    units = _fsdp_units(model)
    if units:
        model._posttrain_full_parameters = True
        # Outer units first does not matter: unshard() of each unit gathers only its own
        # parameters. reshard_after_forward=False keeps them whole across the many forwards of
        # a decode loop; the original setting is restored on exit.
        saved = [_reshard_setting(unit) for unit in units]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit, setting in zip(units, saved):
                _restore_reshard_setting(unit, setting)
                unit.reshard()
            model._posttrain_full_parameters = False
        return
    if _is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
    yield


def _reshard_setting(unit) -> tuple:
    state = unit._get_fsdp_state()
    groups = list(getattr(state, "_fsdp_param_groups", []))
    return (
        state,
        getattr(state, "_auto_reshard_after_forward", None),
        [(g, g.post_forward_mesh_info) for g in groups],
    )


def _restore_reshard_setting(unit, setting: tuple) -> None:
    state, auto, groups = setting
    if auto is not None:
        state._auto_reshard_after_forward = auto
    for group, mesh_info in groups:
        group.post_forward_mesh_info = mesh_info


def shard_frozen(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen (eval-only) model as the engine places the trained one."""
    from accelerate.utils import DistributedType

    module.requires_grad_(False)
    module.eval()
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        accelerator.state.fsdp_plugin.set_auto_wrap_policy(module)
        return fsdp2_prepare_model(accelerator, module)
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": accelerator.mixed_precision == "bf16"},
        }
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.module.eval()
        return engine.module
    return module.to(accelerator.device)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage on this rank: a DTensor's local shard, a ZeRO-3 partition,
    or the whole tensor when replicated."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            local = p.ds_tensor
        total += local.numel() * local.element_size()
    return total


def full_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole model's parameters (global shapes)."""
    total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", None) or p.numel()  # DTensor.numel() is global
        total += numel * p.element_size()
    return total
