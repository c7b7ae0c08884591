"""The one training loop, on Accelerate, shared by every algorithm.

Per optimizer step:
1. the algorithm hands this process its micro-batches;
2. the loss units (tokens, pairs, sequences) of all micro-batches on all processes are summed
   with one all-reduce, so the update equals one big batch whatever the split into processes
   and accumulation steps (spec section 1; OpenRLHF/TRL `num_items_in_batch`);
3. each micro-batch's summed loss is scaled by world_size / global_units (DDP averages
   gradients over processes) and back-propagated, with gradient sync only on the last one;
4. gradients are clipped by global norm, per trained model; a non-finite norm in any of them
   skips the update of all and is counted (with fp16 the GradScaler does this and lowers the
   scale; its skipped steps are counted too);
5. each model's AdamW and schedule step, metrics go to metrics.jsonl, checkpoints are atomic.

The loop owns every optimizer: the policy's, and those of the extra models an algorithm
registers (PPO's critic), so clipping, skipping, precision, sharding and checkpoints treat them
alike. Sharding (FSDP2, DeepSpeed ZeRO) is Accelerate's, chosen in train/distributed.py; under
it the final save gathers full state dicts on every rank before rank 0 writes `final/`.

Mixture-of-experts models get their router losses, load metrics and aux-free balancing here, for
every algorithm alike (posttrain/models/moe.py); dense models skip all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from posttrain.algorithms.base import Algorithm, Trainable
from posttrain.config import BaseRecipe, save_config
from posttrain.evaluation import build_periodic_eval
from posttrain.models.moe import MoEObjective
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import make_accelerator
from posttrain.train.final import model_writer, save_final
from posttrain.train.hub import check_hub_ready
from posttrain.train.logging import MetricsLogger, ProgressBar, quiet_library_noise
from posttrain.train.memory import gradient_bytes, parameter_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.trackers import start_trackers

__all__ = ["make_accelerator", "train", "accumulate_gradients", "TrainResult"]


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


def train(
    cfg: BaseRecipe,
    algorithm: Algorithm,
    accelerator: Accelerator | None = None,
    callbacks: Sequence = (),
) -> TrainResult:
    """Train `algorithm` for cfg.train.max_steps optimizer steps. `callbacks`: objects with any
    of on_step_end(step, state), on_log(step, metrics), on_evaluate(step, metrics), called on
    every process (see `_notify`)."""
    check_hub_ready(cfg.train)  # push_to_hub that cannot work: one line now, not after training
    quiet_library_noise(warnings_too=False)
    accelerator = accelerator or make_accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        ckpt.remove_stale_temporaries(out)
    accelerator.wait_for_everyone()
    start_trackers(accelerator, cfg)  # before the model loads: a login problem shows at once

    model = algorithm.setup(accelerator)
    periodic_eval = build_periodic_eval(cfg, algorithm.name)  # `evaluation` section, or None
    trained = [Trainable("model", model, cfg.optim), *algorithm.extra_trainables()]
    # None for dense models. Built before `prepare` so its hooks sit on the unwrapped modules.
    moe = MoEObjective.build([t.module for t in trained], cfg.model.moe)
    prepare_trainables(accelerator, trained, cfg)
    model = trained[0].module
    state = LoopState()
    accelerator.register_for_checkpointing(
        *[t.scheduler for t in trained], state, _AlgorithmState(algorithm)
    )
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

    logger = MetricsLogger(
        out,
        main,
        resume_step=state.step if resumed_from is not None else None,
        accelerator=accelerator,
    )
    bar = ProgressBar(
        cfg.train.max_steps, algorithm.name, main and cfg.logging.progress, state.step
    )
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    window = _MetricWindow()
    grad_bytes = None
    last_metrics: dict = {}
    started = time.perf_counter()
    t_window = time.perf_counter()

    while state.step < cfg.train.max_steps:
        step = state.step
        batches = algorithm.micro_batches(step, accelerator, model)
        for t in trained:
            t.module.train()
        modules = [t.module for t in trained]
        global_units = accumulate_gradients(accelerator, modules, algorithm, batches, window, moe)

        norms = {t.name: _clip(accelerator, t, max_norm) for t in trained}
        finite = all(n is None or bool(torch.isfinite(n)) for n in norms.values())
        if finite or cfg.train.mixed_precision == "fp16":
            for t in trained:
                t.optimizer.step()
            # fp16: the GradScaler skipped a non-finite step itself (and lowered its scale)
            if accelerator.optimizer_step_was_skipped:
                state.nonfinite_steps += 1
            else:
                for t in trained:
                    t.scheduler.step()
        else:
            state.nonfinite_steps += 1
        if grad_bytes is None:  # measured once, for train_summary.json
            grad_bytes = sum(gradient_bytes(t.module) for t in trained)
        for t in trained:
            t.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window.add_step(global_units, norms.get("model"))
        for name, norm in norms.items():
            if name != "model" and norm is not None:
                window.extra[f"{name}_grad_norm"] = float(norm)
                window.extra[f"{name}_lr"] = trained_by_name(trained, name).scheduler.get_last_lr()[
                    0
                ]
        extra = algorithm.on_step_end(model, state.step, accelerator)
        window.extra.update(extra or {})
        logger.log_samples(state.step, algorithm.pop_samples())
        if moe is not None:
            window.extra.update(moe.on_step_end(accelerator))
        if callbacks:  # a copy: a callback cannot move the loop's own counters
            _notify(callbacks, "on_step_end", state.step, dataclasses.replace(state))

        is_last = state.step == cfg.train.max_steps
        if state.step % cfg.logging.log_every == 0 or is_last:
            metrics = window.summarise(accelerator, time.perf_counter() - t_window)
            state.tokens_seen += int(metrics.get("tokens", 0))
            metrics.update(
                lr=trained[0].scheduler.get_last_lr()[0],
                epoch=_epoch(algorithm, state.step),
                nonfinite_steps=state.nonfinite_steps,
                tokens_seen=state.tokens_seen,
            )
            t_window = time.perf_counter()
            eval_now = cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0
            evaluated = None
            if eval_now or is_last:
                bar.update(state.step, _status(metrics) + " evaluating ...")
                evaluated = dict(algorithm.evaluate(model, accelerator))
                if periodic_eval is not None:
                    policy = accelerator.unwrap_model(model)
                    evaluated.update(periodic_eval(policy, algorithm.tokenizer, accelerator))
                metrics.update({f"eval/{k}": v for k, v in evaluated.items()})
            logger.log(state.step, metrics)
            _notify(callbacks, "on_log", state.step, dict(metrics))
            if evaluated:  # an algorithm without held-out data returns {}
                _notify(callbacks, "on_evaluate", state.step, evaluated)
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
                write_hf=model_writer(accelerator, cfg, algorithm, trained, moe)
                if cfg.train.save_hf_checkpoints
                else None,
            )

    bar.close()
    logger.close()
    final = save_final(accelerator, cfg, algorithm, trained, moe, state.step, last_metrics)
    summary = {
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_steps,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        **parameter_summary(accelerator, trained, grad_bytes or 0),
        "seconds": time.perf_counter() - started,
        **_jsonable(last_metrics),
    }
    if main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    if moe is not None:
        moe.close()
    return TrainResult(out, final, state.step, last_metrics, time.perf_counter() - started)


def prepare_trainables(accelerator: Accelerator, trained: list[Trainable], cfg: BaseRecipe) -> None:
    """Give each trained model its AdamW and schedule and prepare the pair with Accelerate
    (FSDP2 shards model and optimizer state together, so they are prepared in one call)."""
    for t in trained:
        if cfg.model.gradient_checkpointing and hasattr(t.module, "gradient_checkpointing_enable"):
            t.module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        t.optimizer = build_optimizer(t.module, t.optim, accelerator.device)
        t.scheduler = build_scheduler(t.optimizer, t.optim, cfg.train.max_steps)
        t.module, t.optimizer = accelerator.prepare(t.module, t.optimizer)


def trained_by_name(trained: list[Trainable], name: str) -> Trainable:
    return next(t for t in trained if t.name == name)


def _clip(accelerator: Accelerator, t: Trainable, max_norm: float):
    params = [p for p in t.module.parameters() if p.requires_grad]
    norm = accelerator.clip_grad_norm_(params, max_norm)
    if norm is not None and hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def accumulate_gradients(
    accelerator: Accelerator,
    models,
    algorithm: Algorithm,
    batches: list,
    window: _MetricWindow | None = None,
    moe: MoEObjective | None = None,
) -> torch.Tensor:
    """Back-propagate this process's micro-batches so that the summed gradient equals that of
    one batch made of every micro-batch on every process; returns the global unit count.
    `models`: the trained module(s), whose gradients sync on the last micro-batch only."""
    models = models if isinstance(models, (list, tuple)) else [models]
    local_units = float(sum(algorithm.num_units(b) for b in batches))
    global_units = accelerator.reduce(
        torch.tensor(local_units, device=accelerator.device), reduction="sum"
    )
    # DDP/FSDP average gradients over processes, hence the world-size factor.
    scale = accelerator.num_processes / global_units.clamp(min=1.0)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # DeepSpeed divides each backward by its accumulation steps: undo it
        scale = scale * accelerator.state.deepspeed_plugin.gradient_accumulation_steps
    for i, batch in enumerate(batches):
        batch = batch.to(accelerator.device)
        sync = i == len(batches) - 1
        with contextlib.ExitStack() as no_sync:
            if deepspeed:  # the engine steps on the boundary we mark, whatever the count
                accelerator.gradient_state._set_sync_gradients(sync)
            elif not sync:
                for m in models:
                    no_sync.enter_context(accelerator.no_sync(m))
            with accelerator.autocast():
                with moe.capture() if moe is not None else contextlib.nullcontext():
                    output = algorithm.compute_loss(models[0], batch)
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


def _notify(callbacks: Sequence, event: str, step: int, payload) -> None:
    """Call `event` on each callback that has it. Every process calls it (the metrics are
    already reduced, so all see the same numbers); a callback that should act once checks
    `accelerate.PartialState().is_main_process`."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(step, payload)


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
