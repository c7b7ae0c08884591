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
from bench.fixtures import MAX_LENGTH, MAX_LENGTH_BIG, MAX_LENGTH_LONG, WORK, make_fixtures
from bench.posttrain_runner import GRPO_GENERATIONS, GRPO_NEW_TOKENS

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
    workload: str = "shared-prompt"  # shared-prompt | long | bigvocab (bench/fixtures.py)
    record: str = ""  # record name; default f"{name}_{preset}"
    model: str = "model"  # fixture key of the checkpoint
    max_length: int = MAX_LENGTH  # rows (sft, dpo, rm) or prompts (grpo) fit in it
    generations: int = GRPO_GENERATIONS  # grpo: samples per prompt
    new_tokens: int = GRPO_NEW_TOKENS  # grpo: max new tokens
    warmup: int | None = None  # untimed steps per run (None: Settings.warmup)
    steps: int | None = None  # timed steps per run (None: Settings.steps)
    rss_target: float | None = None  # peak RSS TRL / posttrain the issue asks for

    def record_name(self, preset: str) -> str:
        return self.record or f"{self.name}_{preset}"


PRECISION = [{"train.mixed_precision": "bf16"}, {"train.mixed_precision": "no"}]
TRL_PRECISION = [{"bf16": True}, {"bf16": False}]


def posttrain_candidates(batch: int, micro: int) -> list[dict]:
    """posttrain's candidates for SFT/DPO/RM: packing (prefix-shared pairs for DPO/RM) in bf16,
    the same as micro-batches x accumulation, packing in fp32."""
    bf16, fp32 = PRECISION
    split = {"train.batch_size": micro, "train.grad_accum": batch // micro}
    return [{"data.packing": True, **bf16}, {"data.packing": True, **bf16, **split},
            {"data.packing": True, **fp32}]  # fmt: skip


def trl_candidates(kind: str, batch: int, micro: int) -> list[dict]:
    """TRL's candidates: bf16 and fp32, padding-free and bfd packing (SFT; DPO's padding_free
    is disabled in TRL 1.16 and RewardTrainer has none), micro-batches x accumulation."""
    split = {"micro_batch": micro}
    if kind == "sft":
        return [{"bf16": True, "padding_free": True}, {"bf16": True, "padding_free": True, **split},
                {"bf16": True, "packing": True}, {"bf16": False, "padding_free": True}]  # fmt: skip
    return [{"bf16": True}, {"bf16": True, **split}, {"bf16": False}]


def trainer_case(kind: str, workload: str, batch: int, micro: int, **kw) -> Case:
    metric = "trained_tokens_per_s" if kind == "sft" else "pairs_per_s"
    lr = 1e-4 if kind == "sft" else 1e-5
    data = "sft_data" if kind == "sft" else "preference_data"
    if workload != "shared-prompt":
        data = data.replace("_data", f"_{workload}_data")
        kw.setdefault("record", f"{kind}_{workload}")
    return Case(kind, metric, data, batch=batch, lr=lr, workload=workload,
                posttrain_configs=posttrain_candidates(batch, micro),
                trl_configs=trl_candidates(kind, batch, micro), **kw)  # fmt: skip


# Case keys as `--cases` names them; shared-prompt cases are recorded as KEY_PRESET.
CASES = {
    "sft": trainer_case("sft", "shared-prompt", 32, 8, target=3.0),
    "dpo": trainer_case("dpo", "shared-prompt", 16, 4, target=2.0),
    "rm": trainer_case("rm", "shared-prompt", 16, 4, target=2.0),
    # 8 prompts x 8 samples, 32 new tokens, beta=0, one optimisation pass (posttrain_runner.py).
    # Lower is better, so the ratio is TRL's seconds per step over posttrain's.
    "grpo": Case("grpo", "seconds_per_step", "rl_data", batch=8, lr=1e-6, target=3.0,
                 posttrain_configs=PRECISION, trl_configs=TRL_PRECISION, steps=1),
    # Long workload: short prompts, 100-500 token responses (bench/fixtures.py).
    "sft_long": trainer_case("sft", "long", 8, 2, target=1.3, max_length=MAX_LENGTH_LONG),
    "dpo_long": trainer_case("dpo", "long", 4, 1, target=1.5, max_length=MAX_LENGTH_LONG),
    "rm_long": trainer_case("rm", "long", 4, 1, target=1.5, max_length=MAX_LENGTH_LONG),
    # 4 prompts x 8 samples (not the 8 x 8): 8 x 8 x 256 tokens alone would take ~10 of
    # make bench's 40 minutes on 2 cores (about 30 s posttrain + 70 s TRL per pair run).
    "grpo_long": Case("grpo", "seconds_per_step", "rl_long_data", batch=4, lr=1e-6, target=3.0,
                      workload="long", record="grpo_long", max_length=64, new_tokens=256,
                      posttrain_configs=PRECISION, trl_configs=TRL_PRECISION, warmup=0, steps=1),
    # Real vocabulary (151,936): 1,024-token sequences; memory is the point (rss_target).
    "sft_bigvocab": Case("sft", "trained_tokens_per_s", "sft_bigvocab_data", batch=1, lr=1e-4,
                         target=1.0, rss_target=2.0, workload="bigvocab", record="sft_bigvocab",
                         model="bigvocab_model", max_length=MAX_LENGTH_BIG, warmup=1, steps=1,
                         posttrain_configs=[{"data.packing": True, **PRECISION[0]}],
                         trl_configs=[{"bf16": True, "padding_free": True}]),
    "grpo_bigvocab": Case("grpo", "seconds_per_step", "rl_bigvocab_data", batch=1, lr=1e-6,
                          target=1.0, rss_target=2.0, workload="bigvocab", record="grpo_bigvocab",
                          model="bigvocab_model", max_length=MAX_LENGTH_BIG - 128,
                          generations=2, new_tokens=128, warmup=0, steps=1,
                          posttrain_configs=PRECISION[:1], trl_configs=TRL_PRECISION[:1]),
}  # fmt: skip
# The largest relative difference in generated tokens per GRPO step between the two sides.
GRPO_TOKEN_TOLERANCE = 0.05


@dataclass
class Settings:
    preset: str = "small"
    pairs: int = 5
    warmup: int = 1  # untimed steps at the start of every run
    steps: int = 2  # timed steps per run
    probe_steps: int = 1  # timed steps of a configuration probe
    threads: int = 2
    device: str = "cpu"
    select: str = "probe"  # probe | fixed
    probe_only: tuple[str, ...] = ()  # with select=probe: probe only these cases (empty: all)

    def probes(self, name: str) -> bool:
        return self.select == "probe" and (not self.probe_only or name in self.probe_only)

    @property
    def suffix(self) -> str:
        return self.preset


def case_warmup(case: Case, settings: Settings) -> int:
    return settings.warmup if case.warmup is None else case.warmup


def case_steps(case: Case, settings: Settings, probe: bool = False) -> int:
    if probe:
        return min(settings.probe_steps, case.steps or settings.probe_steps)
    return settings.steps if case.steps is None else case.steps


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


def run_process(argv: list[str], log: Path, env: dict, cpu: list | None = None) -> float:
    """Run argv to completion with output to `log`; returns the child's peak RSS in MiB and
    appends its CPU seconds (user + system) to `cpu` (the wall time on an idle machine is about
    that over the thread count; used to size the runs on a shared one)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all runs).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); see {log}:\n{tail}")
    if cpu is not None:
        cpu.append(usage.ru_utime + usage.ru_stime)
    return usage.ru_maxrss / 1024  # Linux reports KiB


def abba_order(pairs: int) -> list[tuple[str, str]]:
    """Side order per pair: A B, B A, A B, ... (posttrain = A), so neither side always runs
    first (the first run of a pair meets a cooler or a busier machine than the second)."""
    return [("posttrain", "trl") if i % 2 == 0 else ("trl", "posttrain") for i in range(pairs)]


def median_ratio(posttrain_rates: list[float], peer_rates: list[float]) -> tuple[float, list]:
    """The reported ratio: the median of the per-pair ratios posttrain / peer (higher is better
    on both), and those ratios."""
    ratios = [a / b for a, b in zip(posttrain_rates, peer_rates, strict=True)]
    return statistics.median(ratios), ratios


def generated_tokens_check(posttrain: list[float], peer: list[float], tolerance: float) -> float:
    """Largest relative difference of generated tokens per GRPO step; raises if a side logged
    no tokens or the two differ by more than `tolerance` (then the step times compare different
    work)."""
    if not posttrain or not peer or min(posttrain) <= 0 or min(peer) <= 0:
        raise RuntimeError(f"GRPO generated tokens per step missing or zero: posttrain "
                           f"{posttrain}, TRL {peer}")  # fmt: skip
    a, b = statistics.mean(posttrain), statistics.mean(peer)
    diff = abs(a - b) / max(a, b)
    if diff > tolerance:
        raise RuntimeError(f"GRPO generated tokens per step differ by {diff:.1%} > "
                           f"{tolerance:.0%}: posttrain {a:.0f}, TRL {b:.0f}")  # fmt: skip
    return diff


def run_side(
    side: str, case: Case, config: dict, steps: int, fx: dict, settings: Settings, tag: str
) -> dict:
    """One training run of one side; returns per-step times/tokens, positions and peak RSS."""
    record = case.record_name(settings.suffix)
    run_dir = WORK / "runs" / record / f"{side}-{tag}"
    warmup = case_warmup(case, settings)
    total = warmup + steps
    model = fx[case.model]
    env = child_env(settings)
    positions = run_dir.with_suffix(".positions.json")
    positions.unlink(missing_ok=True)
    env.update(BENCH_POSITIONS=str(positions), BENCH_VOCAB=str(mfu.vocab_size(model)))
    if side == "posttrain":
        recipe = WORK / "recipes" / f"{record}.yaml"
        posttrain_side.write_recipe(case.name, model, fx[case.data], recipe, batch=case.batch,
                                    lr=case.lr, max_length=case.max_length,
                                    threads=settings.threads, generations=case.generations,
                                    new_tokens=case.new_tokens)  # fmt: skip
        argv = posttrain_side.command(case.name, recipe, run_dir, total, config)
    else:
        prompts_log = run_dir.with_suffix(".prompts.jsonl")
        prompts_log.unlink(missing_ok=True)
        env["BENCH_PROMPTS_LOG"] = str(prompts_log)
        options = dict(batch=case.batch, steps=total, lr=case.lr, max_length=case.max_length,
                       threads=settings.threads, device=settings.device)  # fmt: skip
        if case.name == "grpo":
            options.update(generations=case.generations, new_tokens=case.new_tokens)
        argv = trl_side.command(case.name, model, fx[case.data], run_dir.with_suffix(".json"),
                                config, **options)  # fmt: skip
    load = os.getloadavg()[0]  # other work on the machine (plus our previous run, decaying)
    started = time.perf_counter()
    cpu: list[float] = []
    peak = run_process(argv, run_dir.with_suffix(".log"), env, cpu)
    wall = time.perf_counter() - started
    if side == "posttrain":
        result = posttrain_side.read_result(run_dir)
        if case.name == "grpo":  # generated tokens = mean completion length x rows
            rows = case.batch * case.generations
            result["step_tokens"] = [round(c * rows) for c in result["completion_length"]]
    else:
        result = json.loads(run_dir.with_suffix(".json").read_text())
    if len(result["step_times"]) != total:
        raise RuntimeError(f"{side} {record}: {len(result['step_times'])} steps, not {total}")
    if positions.is_file():
        result["positions"] = json.loads(positions.read_text())
    result.update(peak_rss_mb=peak, config=config, argv=argv, load=load, wall_s=wall, cpu_s=cpu[0])
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


def effective_tokens_per_s(case: Case, result: dict, warmup: int) -> float:
    """Nominal throughput: the non-pad tokens each side trained (SFT/DPO/RM) or generated
    (GRPO) per second of the timed steps."""
    return sum(result["step_tokens"][warmup:]) / sum(result["step_times"][warmup:])


def hw_flops_per_s(case: Case, result: dict, warmup: int, fx: dict) -> float | None:
    """Hardware FLOP/s: the token positions the model really computed (padding included, a
    shared prompt once), from bench/positions.py, spread evenly over the run's steps. None
    for GRPO (generation dominates; see mfu.py) or when the counter did not report."""
    counted = result.get("positions")
    if case.name == "grpo" or not counted:
        return None
    steps = result["step_times"]
    flops = mfu.hw_flops(case.name, fx[case.model], counted) * (len(steps) - warmup) / len(steps)
    return flops / sum(steps[warmup:])


def select_config(
    name: str, case: Case, fx: dict, settings: Settings, say
) -> tuple[dict, dict, list]:
    """Each side's fastest candidate, from one short probe run per candidate; the sides take
    turns (posttrain's candidate i, TRL's candidate i, ...), so a busy spell hits both."""
    if not settings.probes(name):
        return case.posttrain_configs[0], case.trl_configs[0], []
    probes = []
    sides = {"posttrain": case.posttrain_configs, "trl": case.trl_configs}
    steps = case_steps(case, settings, probe=True)
    warmup = case_warmup(case, settings)
    for i in range(max(len(c) for c in sides.values())):
        order = sides.items() if i % 2 == 0 else reversed(list(sides.items()))
        for side, configs in order:
            if i < len(configs) and len(configs) > 1:
                r = run_side(side, case, configs[i], steps, fx, settings, f"probe{i}")
                probes.append({"side": side, "config": configs[i], "rate": rate(case, r, warmup),
                               "effective": r.get("effective"),
                               "rss_mib": r["peak_rss_mb"]})  # fmt: skip
                say(f"  probe {side:9} {_fmt_config(configs[i]):50} "
                    f"{reported(case, probes[-1]['rate']):10.2f}")  # fmt: skip
    best = {}
    for side, configs in sides.items():
        mine = [p for p in probes if p["side"] == side]
        best[side] = max(mine, key=lambda p: p["rate"])["config"] if mine else configs[0]
    return best["posttrain"], best["trl"], probes


def run_case(name: str, settings: Settings, peaks: dict, say=print) -> dict:
    """Select, then run the two sides in ABBA order `pairs` times; returns the case's record."""
    case = CASES[name]
    started = time.perf_counter()
    fx = make_fixtures(settings.preset)
    record = case.record_name(settings.suffix)
    select = "probe" if settings.probes(name) else "fixed"
    say(f"[{record}] ({case.workload}) selecting configurations ({select})")
    pt_config, trl_config, probes = select_config(name, case, fx, settings, say)
    config = {"posttrain": pt_config, "trl": trl_config}
    runs = {"posttrain": [], "trl": []}
    warmup, steps = case_warmup(case, settings), case_steps(case, settings)
    for pair, order in enumerate(abba_order(settings.pairs)):
        for side in order:
            runs[side].append(
                run_side(side, case, config[side], steps, fx, settings, f"pair{pair}")
            )
        pt, trl = (rate(case, runs[s][-1], warmup) for s in ("posttrain", "trl"))
        say(f"  pair {pair} ({order[0][0]}{order[1][0]}): posttrain {reported(case, pt):10.2f}  "
            f"trl {reported(case, trl):10.2f}  ratio {pt / trl:5.2f}")  # fmt: skip
    return summarise(case, settings, fx, peaks, runs, probes, time.perf_counter() - started)


def summarise(case, settings, fx, peaks, runs, probes, seconds) -> dict:
    """The case's record: the schema fields first (case, metric, posttrain, peer, ratio, pairs,
    hw_mfu_*, rss_*_mib, peer_settings), then the detail."""
    w, peer = case_warmup(case, settings), {"posttrain": "posttrain", "trl": "peer"}

    def med(fn) -> dict:
        return {peer[s]: statistics.median(fn(r) for r in runs[s]) for s in runs}

    pt_config, trl_config = runs["posttrain"][0]["config"], runs["trl"][0]["config"]
    effective = runs["trl"][0].get("effective") or {}
    dtype = {"posttrain": "bf16" if pt_config.get("train.mixed_precision") == "bf16" else "fp32",
             "peer": effective.get("precision") or ("bf16" if trl_config.get("bf16") else "fp32")}  # fmt: skip
    rates = {side: reported(case, v) for side, v in med(lambda r: rate(case, r, w)).items()}
    rss = med(lambda r: r["peak_rss_mb"])
    ratio, ratios = median_ratio([rate(case, r, w) for r in runs["posttrain"]],
                                 [rate(case, r, w) for r in runs["trl"]])  # fmt: skip
    hw = {}
    if case.name != "grpo":
        flops = med(lambda r: hw_flops_per_s(case, r, w, fx) or 0.0)
        hw = {s: flops[s] / peaks["bf16"] if flops[s] else None for s in flops}
    tokens = med(lambda r: statistics.mean(r["step_tokens"][w:]))
    token_diff = None
    if case.name == "grpo":
        token_diff = generated_tokens_check(
            [t for r in runs["posttrain"] for t in r["step_tokens"][w:]],
            [t for r in runs["trl"] for t in r["step_tokens"][w:]], GRPO_TOKEN_TOLERANCE)  # fmt: skip
    common = {"workload": case.workload, "preset": settings.preset, "batch": case.batch,
              "max_length": case.max_length, "model": Path(fx[case.model]).parent.name,
              "vocab_size": mfu.vocab_size(fx[case.model]),
              "unit": {"sft": "sequences", "grpo": "prompts"}.get(case.name, "pairs"), "lr": case.lr,
              "scheduler": "constant", "warmup_steps_untimed": w, "timed_steps": case_steps(case, settings),
              "pairs": settings.pairs, "order": "ABBA", "threads": settings.threads,
              "device": settings.device, "data": Path(fx[case.data]).name,
              "select": "probe" if probes else "fixed (first candidate of each side)",
              "lengths": fx["lengths"][case.data.removesuffix("_data")]}  # fmt: skip
    if case.name == "grpo":
        common.update(generations=case.generations, new_tokens=case.new_tokens, beta=0.0,
                      prompts="identical: TRL in file order, posttrain a copy permuted so its "
                      "sampler yields file order (posttrain_runner.in_sampler_order)")  # fmt: skip
    peer_settings = {"name": "trl", "version": runs["trl"][0].get("trl_version"),
                     "config": trl_config, "effective": effective,
                     "command": " ".join(runs["trl"][0]["argv"][1:])}  # fmt: skip
    return {
        "case": case.record_name(settings.suffix), "metric": case.metric,
        "posttrain": rates["posttrain"], "peer": rates["peer"], "ratio": ratio,
        "pairs": settings.pairs,
        "hw_mfu_posttrain": hw.get("posttrain"), "hw_mfu_peer": hw.get("peer"),
        "rss_posttrain_mib": rss["posttrain"], "rss_peer_mib": rss["peer"],
        "peer_settings": peer_settings,
        "workload": case.workload, "pair_ratios": ratios, "target": case.target,
        "rss_target": case.rss_target, "rss_ratio": rss["peer"] / rss["posttrain"],
        "hw_mfu_basis": "% of measured bf16 matmul peak (mfu.measure_peak: best of 5 "
                        f"{mfu.PEAK_SIZE}x{mfu.PEAK_SIZE} bf16 torch.matmul, {settings.threads} threads)",
        "effective_tokens_per_s": med(lambda r: effective_tokens_per_s(case, r, w)),
        "tokens_per_step": tokens, "generated_tokens_diff": token_diff,
        "positions": {peer[s]: runs[s][0].get("positions") for s in runs},
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
            "peer": {**peer_settings, "dtype": dtype["peer"]},
            "probes": probes, "matmul_peak_flops": peaks,
        },
        "run_seconds": {peer[s]: [r["wall_s"] for r in runs[s]] for s in runs},
        "run_cpu_seconds": {peer[s]: [r["cpu_s"] for r in runs[s]] for s in runs},
        "seconds": seconds,
    }  # fmt: skip


def run_rollout(settings: Settings, say=print) -> list[str]:
    """bench/rollout_bench.py (another helper's script), when present: it appends its record."""
    script = BENCH / "rollout_bench.py"
    if not script.is_file():
        say("rollout: bench/rollout_bench.py not present, skipped")
        return []
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
    return [f"rollout_{settings.suffix}"]


def run_speculative(settings: Settings, say=print) -> list[str]:
    """bench/speculative_bench.py: MTP self-speculative vs plain greedy rollouts at batch 1, 16,
    64, and `speculative: auto` at batch 64 (own records)."""
    argv = [sys.executable, str(BENCH / "speculative_bench.py"), "--pairs", str(settings.pairs)]
    argv += ["--threads", str(settings.threads), "--device", settings.device, "--record"]
    run_process(argv, WORK / "runs" / "rollout_speculative.log", child_env(settings))
    return [f"rollout_speculative_b{b}" for b in (1, 16, 64)] + ["rollout_speculative_auto_b64"]


EXTERNAL = {"rollout": run_rollout, "speculative": run_speculative}


def _fmt_config(config: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in config.items()) or "default"
