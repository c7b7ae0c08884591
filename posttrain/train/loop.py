"""The one training loop, on Accelerate, shared by every algorithm.

Per optimizer step:
1. the algorithm hands this process its micro-batches;
2. the loss units (tokens, pairs, sequences) of all micro-batches on all processes are summed
   with one all-reduce, so the update equals one big batch whatever the split into processes
   and accumulation steps (spec section 1; OpenRLHF/TRL `num_items_in_batch`);
3. each micro-batch's summed loss is scaled by world_size / global_units (DDP averages
   gradients over processes) and back-propagated, with gradient sync only on the last one;
4. gradients are clipped by global norm; a non-finite norm skips the update and is counted
   (with fp16 the GradScaler does this and lowers the scale);
5. AdamW steps, the schedule steps, metrics go to metrics.jsonl, checkpoints are atomic.

Mixture-of-experts models get their router losses, load metrics and aux-free balancing here, for
every algorithm alike (posttrain/models/moe.py); dense models skip all of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from posttrain.algorithms.base import Algorithm
from posttrain.config import BaseRecipe, ConfigError, save_config
from posttrain.models.moe import MoEObjective
from posttrain.train import checkpoint as ckpt
from posttrain.train.logging import MetricsLogger, ProgressBar
from posttrain.train.optim import build_optimizer, build_scheduler


@dataclass
class LoopState:
    """Loop counters saved with every checkpoint (registered with Accelerate)."""

    step: int = 0
    nonfinite_steps: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class _AlgorithmState:
    """Adapter so an algorithm's own state (KL controller, curriculum, ...) is checkpointed."""

    def __init__(self, algorithm: Algorithm):
        self.algorithm = algorithm

    def state_dict(self) -> dict:
        return self.algorithm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    last_metrics: dict
    seconds: float


def make_accelerator(cfg: BaseRecipe) -> Accelerator:
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 loss scaling is a GPU path); "
            "on CPU use 'bf16' or 'no'"
        )
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    # Accelerate only sets up a gloo process group for torchrun-launched CPU processes when told
    # it runs on CPU; on GPUs it picks NCCL by itself.
    on_cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=precision, cpu=on_cpu, step_scheduler_with_optimizer=False)


def train(
    cfg: BaseRecipe, algorithm: Algorithm, accelerator: Accelerator | None = None
) -> TrainResult:
    accelerator = accelerator or make_accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        ckpt.remove_stale_temporaries(out)
    accelerator.wait_for_everyone()

    model = algorithm.setup(accelerator)
    # None for dense models. Built before `prepare` so its hooks sit on the unwrapped modules.
    moe = MoEObjective.build([model, *algorithm.extra_trained_models()], cfg.model.moe)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(model, cfg.optim, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = LoopState()
    accelerator.register_for_checkpointing(scheduler, state, _AlgorithmState(algorithm))
    if moe is not None and moe.bias is not None:
        accelerator.register_for_checkpointing(moe)

    resumed_from = None
    if cfg.train.resume:
        latest = ckpt.latest_checkpoint(out)
        if latest is not None:
            ckpt.load_checkpoint(accelerator, latest)
            resumed_from = latest
    if main and resumed_from is not None:
        accelerator.print(f"resumed from {resumed_from} at step {state.step}")

    logger = MetricsLogger(out, main, cfg.logging.tensorboard, append=resumed_from is not None)
    bar = ProgressBar(
        cfg.train.max_steps, algorithm.name, main and cfg.logging.progress, state.step
    )
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    window = _MetricWindow()
    last_metrics: dict = {}
    started = time.perf_counter()
    t_window = time.perf_counter()

    while state.step < cfg.train.max_steps:
        step = state.step
        batches = algorithm.micro_batches(step, accelerator, model)
        model.train()
        global_units = accumulate_gradients(accelerator, model, algorithm, batches, window, moe)

        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        finite = bool(torch.isfinite(grad_norm)) if grad_norm is not None else True
        if finite or cfg.train.mixed_precision == "fp16":
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
        else:
            state.nonfinite_steps += 1
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window.add_step(global_units, grad_norm)
        extra = algorithm.on_step_end(model, state.step, accelerator)
        window.extra.update(extra or {})
        if moe is not None:
            window.extra.update(moe.on_step_end(accelerator))

        is_last = state.step == cfg.train.max_steps
        if state.step % cfg.logging.log_every == 0 or is_last:
            metrics = window.summarise(accelerator, time.perf_counter() - t_window)
            state.tokens_seen += int(metrics.get("tokens", 0))
            metrics.update(
                lr=scheduler.get_last_lr()[0],
                epoch=_epoch(algorithm, state.step),
                nonfinite_steps=state.nonfinite_steps,
                tokens_seen=state.tokens_seen,
            )
            t_window = time.perf_counter()
            eval_now = cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0
            if eval_now or is_last:
                metrics.update(
                    {f"eval/{k}": v for k, v in algorithm.evaluate(model, accelerator).items()}
                )
            logger.log(state.step, metrics)
            last_metrics = metrics
            bar.update(state.step, _status(metrics))
        else:
            bar.update(state.step)

        if (cfg.train.save_every > 0 and state.step % cfg.train.save_every == 0) or (
            is_last and cfg.train.save_every > 0
        ):
            ckpt.save_checkpoint(
                accelerator,
                out,
                state.step,
                cfg.train.keep_checkpoints,
                extra_files={"config.yaml": (out / "config.yaml").read_text()} if main else None,
            )

    bar.close()
    logger.close()
    final = out / "final"
    accelerator.wait_for_everyone()
    if main:
        final.mkdir(parents=True, exist_ok=True)
        algorithm.save_final(accelerator.unwrap_model(model), final)
        if moe is not None:
            moe.save(final)
        save_config(cfg, final / "posttrain_config.yaml")
        (out / "train_summary.json").write_text(
            json.dumps(
                {
                    "steps": state.step,
                    "nonfinite_steps": state.nonfinite_steps,
                    "num_processes": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type),
                    "seconds": time.perf_counter() - started,
                    **_jsonable(last_metrics),
                },
                indent=1,
            )
        )
    accelerator.wait_for_everyone()
    if moe is not None:
        moe.close()
    return TrainResult(out, final, state.step, last_metrics, time.perf_counter() - started)


def accumulate_gradients(
    accelerator: Accelerator,
    model,
    algorithm: Algorithm,
    batches: list,
    window: _MetricWindow | None = None,
    moe: MoEObjective | None = None,
) -> torch.Tensor:
    """Back-propagate this process's micro-batches so that the summed gradient equals that of
    one batch made of every micro-batch on every process; returns the global unit count."""
    local_units = float(sum(algorithm.num_units(b) for b in batches))
    global_units = accelerator.reduce(
        torch.tensor(local_units, device=accelerator.device), reduction="sum"
    )
    # DDP averages gradients over processes, hence the world-size factor.
    scale = accelerator.num_processes / global_units.clamp(min=1.0)
    for i, batch in enumerate(batches):
        batch = batch.to(accelerator.device)
        sync = i == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            with accelerator.autocast():
                with moe.capture() if moe is not None else contextlib.nullcontext():
                    output = algorithm.compute_loss(model, batch)
                if moe is not None:  # router losses, weighted like this micro-batch's units
                    output = moe.add_to_loss(output, float(algorithm.num_units(batch)))
            accelerator.backward(output.total * scale)
        if window is not None:
            window.add_micro(output, algorithm.num_tokens(batch))
    return global_units


class _MetricWindow:
    """Accumulates metrics between log lines without host syncs; reduces across processes."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss_sum = None
        self.units = None
        self.metric_sums: dict[str, torch.Tensor] = {}
        self.metric_counts: dict[str, int] = {}
        self.tokens = 0
        self.steps = 0
        self.grad_norms: list[torch.Tensor] = []
        self.extra: dict = {}

    def add_micro(self, output, tokens: int) -> None:
        total = output.total.detach().float()
        self.loss_sum = total if self.loss_sum is None else self.loss_sum + total
        for key, value in output.metrics.items():
            value = torch.as_tensor(value).detach().float()
            self.metric_sums[key] = self.metric_sums.get(key, 0) + value
            self.metric_counts[key] = self.metric_counts.get(key, 0) + 1
        self.tokens += tokens

    def add_step(self, global_units: torch.Tensor, grad_norm) -> None:
        self.units = global_units if self.units is None else self.units + global_units
        if grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(grad_norm).detach().float())
        self.steps += 1

    def summarise(self, accelerator: Accelerator, seconds: float) -> dict:
        device = accelerator.device
        keys = sorted(self.metric_sums)
        local = torch.stack(
            [self.loss_sum.to(device), torch.tensor(float(self.tokens), device=device)]
            + [(self.metric_sums[k] / self.metric_counts[k]).to(device) for k in keys]
        )
        summed = accelerator.reduce(local, reduction="sum").tolist()
        world = accelerator.num_processes
        metrics = {
            "loss": summed[0] / max(float(self.units), 1.0),
            "tokens": summed[1],
            "tokens_per_s": summed[1] / max(seconds, 1e-9),
            "step_time": seconds / max(self.steps, 1),
        }
        if self.grad_norms:
            metrics["grad_norm"] = float(torch.stack(self.grad_norms).mean())
        metrics.update({k: v / world for k, v in zip(keys, summed[2:])})
        metrics.update(self.extra)
        self.reset()
        return metrics


def _epoch(algorithm: Algorithm, step: int) -> float | None:
    fn = getattr(algorithm, "epoch_at", None)
    return fn(step) if fn else None


def _status(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.4f}"]
    if "eval/loss" in metrics:
        parts.append(f"eval {metrics['eval/loss']:.4f}")
    parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return " ".join(parts)


def _jsonable(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and (not isinstance(v, float) or math.isfinite(v))
    }
