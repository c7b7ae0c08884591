"""Which engine trains: replicated (DDP or one process), FSDP2, or DeepSpeed ZeRO-2/3.

Every engine is Accelerate's; posttrain adds no sharding layer of its own. The choice comes
from two places that mean the same thing, and they must agree:
- the recipe key `train.sharding` (`auto` takes whatever the launcher asks for);
- the launcher's environment, written by `accelerate launch --config_file ...`
  (ACCELERATE_USE_FSDP + FSDP_VERSION, ACCELERATE_USE_DEEPSPEED + ACCELERATE_DEEPSPEED_ZERO_STAGE).

Nothing falls back silently (issue 11): an FSDP/DeepSpeed request that cannot be honoured, a
conflict between recipe and launcher, or fewer processes than the launcher asked for stops the
run with a one-line LaunchError.

FSDP2 on CPU: Accelerate only switches to FSDP for GPU-like devices, and builds a MULTI_CPU
state under `torchrun` on CPU. torch's `fully_shard` itself runs on CPU over gloo, so here we
build the CPU Accelerator and then mark its state as FSDP with our plugin; from then on
`prepare`, `save_state`/`load_state` (torch distributed checkpoint) and `get_state_dict` take
Accelerate's own FSDP2 code paths. That is what the tests exercise on 2 cores.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from posttrain.config import BaseRecipe, ConfigError
from posttrain.train.trackers import accelerator_kwargs

SHARDINGS = ("none", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


class LaunchError(ConfigError):
    """The launch (processes, engine) is not what the recipe or launcher asked for."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launcher_sharding() -> str | None:
    """The sharding an `accelerate launch` config asked for through the environment, or None."""
    if _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise LaunchError(
                f"the Accelerate config asks for FSDP version {version}; posttrain trains with "
                "FSDP2 only: set `fsdp_version: 2` in fsdp_config "
                "(see recipes/accelerate/fsdp2.yaml)"
            )
        return "fsdp2"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        if stage not in ("2", "3"):
            raise LaunchError(
                f"the Accelerate config asks for DeepSpeed ZeRO stage {stage or '(unset)'}; "
                "posttrain supports zero_stage 2 or 3 "
                "(see recipes/accelerate/deepspeed_zero{2,3}.yaml)"
            )
        return f"deepspeed_zero{stage}"
    return None


def requested_sharding(cfg: BaseRecipe) -> str:
    """`none`, `fsdp2`, `deepspeed_zero2` or `deepspeed_zero3`, from recipe and launcher."""
    recipe = cfg.train.sharding
    launcher = launcher_sharding()
    if recipe == "auto":
        return launcher or "none"
    if launcher is not None and launcher != recipe:
        raise LaunchError(
            f"train.sharding={recipe} but the Accelerate launch config asks for {launcher}; "
            "make them agree (or set train.sharding=auto to follow the launcher)"
        )
    return recipe


def check_process_count() -> None:
    """Stop when fewer processes started than the launcher meant to start.

    `accelerate launch --cpu --num_processes N` (and a MULTI_CPU config without a hostfile)
    starts ONE process with a rendezvous address set but no WORLD_SIZE: training would run with
    1/N of the global batch and nothing would say so.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != world:
        raise LaunchError(
            f"WORLD_SIZE={world} but {dist.get_world_size()} processes joined the process group"
        )
    if world == 1 and "MASTER_ADDR" in os.environ and _env_true("ACCELERATE_USE_CPU"):
        raise LaunchError(
            "`accelerate launch --cpu` with several processes starts only ONE process (no "
            "WORLD_SIZE was set); on CPU launch with `torchrun --nproc_per_node N -m posttrain ...` "
            "or `accelerate launch --multi_gpu --num_processes N ...`"
        )


def fsdp2_plugin(cfg: BaseRecipe, offload: bool | None) -> FullyShardedDataParallelPlugin:
    """FSDP2 over every transformer block (the model's `_no_split_modules`), sharded state dicts
    in checkpoints (torch distributed checkpoint: each rank writes its shards), full state dict
    gathered for `final/`. Activation checkpointing stays with transformers'
    `gradient_checkpointing_enable` (model.gradient_checkpointing), which composes with it."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT",
        # None: the launcher config's FSDP_OFFLOAD_PARAMS / FSDP_ACTIVATION_CHECKPOINTING decide.
        cpu_offload=offload,
        # transformers' own checkpointing when the recipe asks for it, never both at once.
        activation_checkpointing=False if cfg.model.gradient_checkpointing else None,
        cpu_ram_efficient_loading=False,
    )


def deepspeed_plugin(cfg: BaseRecipe, stage: int) -> DeepSpeedPlugin:
    """ZeRO-2/3 with the recipe's micro-batch and accumulation, so `prepare()` needs no
    DataLoader; ZeRO-3 gathers 16-bit weights for `final/`."""
    # None: the launcher config's offload devices decide; train.cpu_offload forces CPU.
    offload = "cpu" if cfg.train.cpu_offload else None
    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        gradient_accumulation_steps=cfg.train.grad_accum,
        gradient_clipping=cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else None,
        offload_optimizer_device=offload,
        offload_param_device=offload if stage == 3 else None,
        zero3_save_16bit_model=stage == 3,
        zero3_init_flag=False,
    )
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return plugin


def make_accelerator(cfg: BaseRecipe) -> Accelerator:
    """The Accelerator for this launch and recipe; raises LaunchError/ConfigError instead of
    training anything other than what was asked."""
    precision = cfg.train.mixed_precision
    on_cpu = not torch.cuda.is_available()
    if precision == "fp16" and on_cpu:
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 loss scaling is a GPU path); "
            "on CPU use 'bf16' or 'no'"
        )
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    check_process_count()
    sharding = requested_sharding(cfg)
    if cfg.train.cpu_offload and sharding == "none":
        raise ConfigError(
            "train.cpu_offload=true offloads sharded parameters and optimizer state: it needs "
            "train.sharding=fsdp2 or a DeepSpeed ZeRO config"
        )
    common = dict(mixed_precision=precision, step_scheduler_with_optimizer=False)
    # logging.report_to's trackers (a missing extra is a one-line error here, before any model)
    common.update(accelerator_kwargs(cfg))
    if sharding.startswith("deepspeed"):
        if on_cpu:
            raise LaunchError(
                f"{sharding} needs CUDA GPUs (DeepSpeed does not train on CPU here); on CPU use "
                "train.sharding=fsdp2 under torchrun"
            )
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise LaunchError(
                f"{sharding} needs the deepspeed extra: pip install 'posttrain[deepspeed]'"
            ) from e
        # Accelerate reads DeepSpeed from its launcher env; a recipe key alone must say it too.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        plugin = deepspeed_plugin(cfg, int(sharding[-1]))
        return Accelerator(deepspeed_plugin=plugin, **common)
    if sharding == "fsdp2":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            raise LaunchError(
                "train.sharding=fsdp2 needs a distributed launch (torchrun --nproc_per_node N, "
                "or accelerate launch --config_file recipes/accelerate/fsdp2.yaml); this is one "
                "process with no process group"
            )
        if not on_cpu:
            offload = True if cfg.train.cpu_offload else None
            return Accelerator(fsdp_plugin=fsdp2_plugin(cfg, offload), **common)
        # Training on CPU, the shards already live in CPU memory: offloading is a no-op there
        # (and FSDP2's offload path pins memory, which needs a GPU).
        plugin = fsdp2_plugin(cfg, offload=False)
        accelerator = Accelerator(cpu=True, **common)
        if cfg.train.cpu_offload or _env_true("FSDP_OFFLOAD_PARAMS"):
            accelerator.print(
                "train.cpu_offload: training on CPU, shards are in CPU memory already"
            )
        _enable_fsdp_on_cpu(accelerator, plugin, precision)
        return accelerator
    if _env_true("ACCELERATE_USE_FSDP") or _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise LaunchError("train.sharding=none under an FSDP/DeepSpeed launch config")
    return Accelerator(cpu=on_cpu, **common)


def _enable_fsdp_on_cpu(
    accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, precision: str
) -> None:
    """Give a MULTI_CPU (gloo) Accelerator the FSDP2 plugin, as Accelerate does on GPUs."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise LaunchError(
            f"FSDP2 on CPU needs a gloo process group (got {accelerator.distributed_type}); "
            "launch with torchrun --nproc_per_node N"
        )
    if precision != "no":
        plugin.set_mixed_precision(precision)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def sharding_of(accelerator: Accelerator) -> str:
    """What actually runs: recorded in train_summary.json."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed_zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "none"


def close_process_group() -> None:
    """End a command's process group cleanly: every process waits for the others at a barrier,
    then the group is destroyed. Left alive, the group is torn down by interpreter shutdown,
    in whatever order Python frees things, while the peer may already be gone; on gloo that
    can abort a process that finished its work ("terminate called without an active
    exception"), failing a run that succeeded. Only the CLI calls this: an API user's script
    may still need the group after `train()`."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
