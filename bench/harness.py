"""The side-by-side harness: posttrain and TRL on the same weights, data and settings.

For each case: pick each side's best configuration on this machine (a short probe run per
candidate, or the first candidate with `--select fixed`), then run the two sides alternately
in separate processes (posttrain, TRL, posttrain, TRL, ...; `pairs` pairs), each run with its
own warm-up steps that are not timed. A pair's ratio is posttrain's rate over TRL's rate in
that pair; the reported ratio is the median over pairs, so a slow spell on a shared machine
hits both sides of one pair rather than one side of the whole comparison.

Extension points: a new trainer case is one more `Case` in CASES plus a builder in
bench/trl_runner.py (TRAINERS) and its recipe section in bench/posttrain_runner.py
(`grpo_small` goes there). A benchmark with its own script (bench/rollout_bench.py) is an entry
in EXTERNAL: a function that runs it and lets it append its record.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import mfu
from bench import posttrain_runner as posttrain_side
from bench import trl_runner as trl_side
from bench.fixtures import MAX_LENGTH, WORK, make_fixtures

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


@dataclass
class Case:
    name: str  # posttrain command / TRL trainer: sft, dpo, rm, grpo
    metric: str  # what the record compares
    data: str  # fixture key
    batch: int  # sequences (sft), pairs (dpo, rm) or prompts (grpo) per optimizer step
    lr: float
    # Candidate configurations, the expected best first (what `--select fixed` takes).
    posttrain_configs: list[dict] = field(default_factory=list)  # dotted recipe overrides
    trl_configs: list[dict] = field(default_factory=list)  # bench/trl_runner.py flags
    target: float = 1.0  # the ratio the issue asks for (drawn on the plot)


PRECISION = [{"train.mixed_precision": "bf16"}, {"train.mixed_precision": "no"}]
TRL_PRECISION = [{"bf16": True}, {"bf16": False}]
CASES = {
    "sft": Case(
        "sft",
        "trained_tokens_per_s",
        "sft_data",
        batch=32,
        lr=1e-4,
        target=3.0,
        posttrain_configs=[{"data.packing": p, **m} for m in PRECISION for p in (True, False)],
        trl_configs=[{"padding_free": p, **m} for m in TRL_PRECISION for p in (True, False)],
    ),
    "dpo": Case(
        "dpo",
        "pairs_per_s",
        "preference_data",
        batch=16,
        lr=1e-5,
        target=2.0,
        posttrain_configs=[{"data.packing": p, **m} for m in PRECISION for p in (True, False)],
        trl_configs=TRL_PRECISION,
    ),
    "rm": Case(
        "rm",
        "pairs_per_s",
        "preference_data",
        batch=16,
        lr=1e-5,
        target=2.0,
        posttrain_configs=[{"data.packing": p, **m} for m in PRECISION for p in (True, False)],
        trl_configs=TRL_PRECISION,
    ),
    # 8 prompts x 8 samples, 32 new tokens, beta=0, one optimisation pass (posttrain_runner.py).
    # Lower is better, so the ratio is TRL's seconds per step over posttrain's.
    "grpo": Case(
        "grpo",
        "seconds_per_step",
        "rl_data",
        batch=8,
        lr=1e-6,
        target=3.0,
        posttrain_configs=PRECISION,
        trl_configs=TRL_PRECISION,
    ),
}


@dataclass
class Settings:
    preset: str = "small"
    pairs: int = 3
    warmup: int = 2  # untimed steps at the start of every run
    steps: int = 8  # timed steps per run
    probe_steps: int = 3  # timed steps of a configuration probe
    threads: int = 2
    device: str = "cpu"
    select: str = "probe"  # probe | fixed

    @property
    def suffix(self) -> str:
        return self.preset


def child_env(settings: Settings) -> dict:
    env = dict(os.environ)
    threads = str(settings.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        HF_DATASETS_CACHE=str(WORK / "hf_datasets"),
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_process(argv: list[str], log: Path, env: dict) -> float:
    """Run argv to completion with output to `log`; returns the child's peak RSS in MiB."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all runs).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); see {log}:\n{tail}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


def run_side(
    side: str, case: Case, config: dict, steps: int, fx: dict, settings: Settings, tag: str
) -> dict:
    """One training run of one side; returns per-step times/tokens and peak RSS."""
    run_dir = WORK / "runs" / f"{case.name}_{settings.suffix}" / f"{side}-{tag}"
    total = settings.warmup + steps
    if side == "posttrain":
        recipe = WORK / "recipes" / f"{case.name}_{settings.suffix}.yaml"
        posttrain_side.write_recipe(
            case.name,
            fx["model"],
            fx[case.data],
            recipe,
            batch=case.batch,
            lr=case.lr,
            max_length=MAX_LENGTH,
            threads=settings.threads,
        )
        argv = posttrain_side.command(case.name, recipe, run_dir, total, config)
    else:
        argv = trl_side.command(case.name, fx["model"], fx[case.data], run_dir.with_suffix(".json"),
                                config, batch=case.batch, steps=total, lr=case.lr,
                                max_length=MAX_LENGTH, threads=settings.threads,
                                device=settings.device)  # fmt: skip
    load = os.getloadavg()[0]  # other work on the machine (plus our previous run, decaying)
    peak = run_process(argv, run_dir.with_suffix(".log"), child_env(settings))
    if side == "posttrain":
        result = posttrain_side.read_result(run_dir)
    else:
        result = json.loads(run_dir.with_suffix(".json").read_text())
    if len(result["step_times"]) != total:
        raise RuntimeError(f"{side} {case.name}: {len(result['step_times'])} steps, not {total}")
    result.update(peak_rss_mb=peak, config=config, argv=argv, load=load)
    return result


def rate(case: Case, result: dict, warmup: int) -> float:
    """Higher is better: trained non-pad tokens/s (SFT), pairs/s (DPO, RM) or steps/s (GRPO)
    over the steps after the warm-up."""
    seconds = sum(result["step_times"][warmup:])
    if case.metric == "trained_tokens_per_s":
        return sum(result["step_tokens"][warmup:]) / seconds
    if case.metric == "seconds_per_step":
        return len(result["step_times"][warmup:]) / seconds
    return case.batch * len(result["step_times"][warmup:]) / seconds


def reported(case: Case, value: float) -> float:
    """The value a record shows: seconds per step is the inverse of the rate compared."""
    return 1.0 / value if case.metric == "seconds_per_step" else value


def achieved_flops(case: Case, result: dict, warmup: int, fx: dict) -> float | None:
    if case.name == "grpo":  # generation dominates; 6·N·tokens does not describe the step
        return None
    lengths = fx["lengths"]["sft" if case.name == "sft" else "preference"]
    tokens = sum(result["step_tokens"][warmup:])
    flops = mfu.step_flops(case.name, fx["model"], tokens, lengths["mean"], lengths["mean_sq"])
    return flops / sum(result["step_times"][warmup:])


def select_config(case: Case, fx: dict, settings: Settings, say) -> tuple[dict, dict, list]:
    """Each side's fastest candidate, from one short probe run per candidate (sides alternate)."""
    if settings.select == "fixed":
        return case.posttrain_configs[0], case.trl_configs[0], []
    probes = []
    sides = {"posttrain": case.posttrain_configs, "trl": case.trl_configs}
    for i in range(max(len(c) for c in sides.values())):
        for side, configs in sides.items():
            if i < len(configs) and len(configs) > 1:
                r = run_side(
                    side, case, configs[i], settings.probe_steps, fx, settings, f"probe{i}"
                )
                probes.append(
                    {"side": side, "config": configs[i], "rate": rate(case, r, settings.warmup)}
                )
                say(f"  probe {side:9} {_fmt_config(configs[i]):40} {probes[-1]['rate']:10.1f}")
    best = {}
    for side, configs in sides.items():
        mine = [p for p in probes if p["side"] == side]
        best[side] = max(mine, key=lambda p: p["rate"])["config"] if mine else configs[0]
    return best["posttrain"], best["trl"], probes


def run_case(case: Case, settings: Settings, peaks: dict, say=print) -> dict:
    """Select, then alternate the two sides `pairs` times; returns the case's record."""
    started = time.perf_counter()
    fx = make_fixtures(settings.preset)
    say(f"[{case.name}_{settings.suffix}] selecting configurations ({settings.select})")
    pt_config, trl_config, probes = select_config(case, fx, settings, say)
    runs = {"posttrain": [], "trl": []}
    for pair in range(settings.pairs):
        for side, config in (("posttrain", pt_config), ("trl", trl_config)):
            runs[side].append(
                run_side(side, case, config, settings.steps, fx, settings, f"pair{pair}")
            )
        pt, trl = (rate(case, runs[s][-1], settings.warmup) for s in ("posttrain", "trl"))
        pt_shown, trl_shown = reported(case, pt), reported(case, trl)
        say(
            f"  pair {pair}: posttrain {pt_shown:10.2f}  trl {trl_shown:10.2f}  ratio {pt / trl:5.2f}"
        )

    return summarise(case, settings, fx, peaks, runs, probes, time.perf_counter() - started)


def summarise(case, settings, fx, peaks, runs, probes, seconds) -> dict:
    """The case's record: medians per side, pair-by-pair ratio, peak RSS, MFU, settings."""
    w, peer = settings.warmup, {"posttrain": "posttrain", "trl": "peer"}

    def med(fn) -> dict:
        return {peer[s]: statistics.median(fn(r) for r in runs[s]) for s in runs}

    pt_config, trl_config = runs["posttrain"][0]["config"], runs["trl"][0]["config"]
    dtype = {"posttrain": "bf16" if pt_config.get("train.mixed_precision") == "bf16" else "fp32",
             "peer": "bf16" if trl_config.get("bf16") else "fp32"}  # fmt: skip
    rates = {side: reported(case, v) for side, v in med(lambda r: rate(case, r, w)).items()}
    rss = med(lambda r: r["peak_rss_mb"])
    flops = med(lambda r: achieved_flops(case, r, w, fx)) if case.name != "grpo" else {}
    ratios = [rate(case, a, w) / rate(case, b, w)
              for a, b in zip(runs["posttrain"], runs["trl"], strict=True)]  # fmt: skip
    common = {"preset": settings.preset, "batch": case.batch, "max_length": MAX_LENGTH,
              "unit": {"sft": "sequences", "grpo": "prompts"}.get(case.name, "pairs"), "lr": case.lr,
              "scheduler": "constant", "grad_accum": 1, "warmup_steps_untimed": w,
              "timed_steps": settings.steps, "pairs": settings.pairs, "threads": settings.threads,
              "device": settings.device, "data": Path(fx[case.data]).name,
              "lengths": fx["lengths"][case.data.removesuffix("_data")]}  # fmt: skip
    return {
        "case": f"{case.name}_{settings.suffix}", "metric": case.metric,
        "posttrain": rates["posttrain"], "peer": rates["peer"], "ratio": statistics.median(ratios),
        "pair_ratios": ratios, "target": case.target,
        "peak_rss_mb": {**rss, "ratio": rss["peer"] / rss["posttrain"]},
        "mfu": {s: flops[s] / peaks[dtype[s]] for s in flops}, "achieved_flops": flops,
        "tokens_per_step": med(lambda r: statistics.mean(r["step_tokens"][w:])),
        # Same batches on both sides: the same non-pad tokens per step and the same first loss
        # (GRPO trains on each side's own samples, so only the settings are the same there).
        "same_step_tokens": case.name != "grpo" and all(
            a["step_tokens"] == b["step_tokens"]
            for a, b in zip(runs["posttrain"], runs["trl"], strict=True)),
        "first_loss": {peer[s]: runs[s][0]["losses"][0] for s in runs},
        # 1-min load average when each run started; our own runs keep it near `threads`.
        "load_average": [r["load"] for s in runs for r in runs[s]],
        "settings": {
            "common": common,
            "posttrain": {"config": pt_config, "dtype": dtype["posttrain"],
                          "command": " ".join(runs["posttrain"][0]["argv"][1:])},
            "peer": {"name": "trl", "version": runs["trl"][0].get("trl_version"),
                     "config": trl_config, "dtype": dtype["peer"], "gradient_checkpointing": False,
                     "command": " ".join(runs["trl"][0]["argv"][1:])},
            "probes": probes, "matmul_peak_flops": peaks,
        },
        "seconds": seconds,
    }  # fmt: skip


def run_rollout(settings: Settings, say=print) -> None:
    """bench/rollout_bench.py (another helper's script), when present: it appends its record."""
    script = BENCH / "rollout_bench.py"
    if not script.is_file():
        say("rollout: bench/rollout_bench.py not present, skipped")
        return
    argv = [
        sys.executable,
        str(script),
        "--preset",
        settings.preset,
        "--pairs",
        str(settings.pairs),
        "--threads",
        str(settings.threads),
        "--device",
        settings.device,
        "--record",
    ]
    run_process(argv, WORK / "runs" / f"rollout_{settings.suffix}.log", child_env(settings))


def run_speculative(settings: Settings, say=print) -> None:
    """bench/speculative_bench.py: MTP self-speculative vs plain greedy rollouts (own record)."""
    argv = [sys.executable, str(BENCH / "speculative_bench.py"), "--pairs", str(settings.pairs)]
    argv += ["--threads", str(settings.threads), "--device", settings.device, "--record"]
    run_process(argv, WORK / "runs" / "rollout_speculative.log", child_env(settings))


EXTERNAL = {"rollout": run_rollout, "speculative": run_speculative}


def _fmt_config(config: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in config.items()) or "default"
