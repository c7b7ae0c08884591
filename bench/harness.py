"""The side-by-side harness: posttrain and TRL on the same weights, data and settings.

For each case: pick each side's best configuration on this machine (a short probe run per
candidate, or the first candidate with `--select fixed`), then run the two sides alternately
(posttrain, TRL, TRL, posttrain, ...; `pairs` pairs), each side in one process for the case:
its warm-up steps (not timed), then one segment of timed steps per pair, waiting at a gate
(bench/gate.py) while the other side runs. A pair's ratio is posttrain's rate over TRL's rate
on that pair's segment (the same batches on both sides); the reported ratio is the median over
pairs, so a slow spell on a shared machine hits both sides of one pair rather than one side of
the whole comparison.

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

from bench import gate, mfu
from bench import posttrain_runner as posttrain_side
from bench import trl_runner as trl_side
from bench.fixtures import (
    BIG_NEW_TOKENS,
    BIG_PROMPT,
    MAX_LENGTH,
    MAX_LENGTH_BIG,
    MAX_LENGTH_LONG,
    WORK,
    make_fixtures,
)
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
                          model="bigvocab_model", max_length=BIG_PROMPT,
                          generations=2, new_tokens=BIG_NEW_TOKENS, warmup=0, steps=1,
                          posttrain_configs=PRECISION[:1], trl_configs=TRL_PRECISION[:1]),
}  # fmt: skip
# The largest relative difference in generated tokens per GRPO step between the two sides.
GRPO_TOKEN_TOLERANCE = 0.05


@dataclass
class Settings:
    preset: str = "small"
    pairs: int = 5
    warmup: int = 1  # untimed steps at the start of each side's process
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


class SideRun:
    """One side's training process for a case: warm-up steps, then `segments` segments of
    `steps` timed steps, stopping at the gate after each segment but the last
    (bench/gate.py), so one process serves every ABBA pair."""

    def __init__(self, side: str, case: Case, config: dict, steps: int, segments: int, fx: dict,
                 settings: Settings, tag: str):  # fmt: skip
        self.side, self.case, self.config = side, case, config
        record = case.record_name(settings.suffix)
        self.record = record
        self.run_dir = run_dir = WORK / "runs" / record / f"{side}-{tag}"
        warmup = case_warmup(case, settings)
        self.total = warmup + steps * segments
        stops = [warmup + steps * (k + 1) for k in range(segments - 1)]
        model = fx[case.model]
        env = child_env(settings)
        self.positions = run_dir.with_suffix(".positions.json")
        self.waits = run_dir.with_suffix(".gate.json")
        for stale in (self.positions, self.waits):
            stale.unlink(missing_ok=True)
        env.update(BENCH_POSITIONS=str(self.positions), BENCH_VOCAB=str(mfu.vocab_size(model)),
                   BENCH_GATE_WAITS=str(self.waits))  # fmt: skip
        if side == "posttrain":
            recipe = WORK / "recipes" / f"{record}.yaml"
            posttrain_side.write_recipe(case.name, model, fx[case.data], recipe, batch=case.batch,
                                        lr=case.lr, max_length=case.max_length,
                                        threads=settings.threads, generations=case.generations,
                                        new_tokens=case.new_tokens)  # fmt: skip
            argv = posttrain_side.command(case.name, recipe, run_dir, self.total, config)
        else:
            prompts_log = run_dir.with_suffix(".prompts.jsonl")
            prompts_log.unlink(missing_ok=True)
            env["BENCH_PROMPTS_LOG"] = str(prompts_log)
            options = dict(batch=case.batch, steps=self.total, lr=case.lr,
                           max_length=case.max_length, threads=settings.threads,
                           device=settings.device)  # fmt: skip
            if case.name == "grpo":
                options.update(generations=case.generations, new_tokens=case.new_tokens)
            argv = trl_side.command(case.name, model, fx[case.data], run_dir.with_suffix(".json"),
                                    config, **options)  # fmt: skip
        self.argv = argv
        self.load = os.getloadavg()[0]  # other work on the machine (plus our own, decaying)
        self.started = time.perf_counter()
        self.proc = gate.GatedProcess(argv, run_dir.with_suffix(".log"), env, REPO, stops)

    def finish(self) -> dict:
        """Wait for the process; returns per-step times/tokens, positions and peak RSS."""
        usage = self.proc.finish()
        wall = time.perf_counter() - self.started
        case, total = self.case, self.total
        if self.side == "posttrain":
            result = posttrain_side.read_result(self.run_dir, self.waits)
            if case.name == "grpo":  # generated tokens = mean completion length x rows
                rows = case.batch * case.generations
                result["step_tokens"] = [round(c * rows) for c in result["completion_length"]]
        else:
            result = json.loads(self.run_dir.with_suffix(".json").read_text())
        if len(result["step_times"]) != total:
            raise RuntimeError(
                f"{self.side} {self.record}: {len(result['step_times'])} steps, not {total}"
            )
        if self.positions.is_file():
            result["positions"] = json.loads(self.positions.read_text())
        result.update(peak_rss_mb=usage.ru_maxrss / 1024,  # Linux reports KiB
                      config=self.config, argv=self.argv, load=self.load, wall_s=wall,
                      cpu_s=usage.ru_utime + usage.ru_stime)  # fmt: skip
        return result


def pair_segments(result: dict, warmup: int, steps: int) -> list[dict]:
    """One run's timed steps cut into its pairs' segments (segment k: the `steps` steps after
    warmup + k * steps); each keeps the run's step count (`run_steps`) for the FLOPs share."""
    times, total = result["step_times"], len(result["step_times"])
    if (total - warmup) % steps or total <= warmup:
        raise RuntimeError(f"{total} steps do not split into {warmup} + k x {steps}")
    return [{**result, "step_times": times[lo : lo + steps],
             "step_tokens": result["step_tokens"][lo : lo + steps], "run_steps": total}
            for lo in range(warmup, total, steps)]  # fmt: skip


def run_side(
    side: str, case: Case, config: dict, steps: int, fx: dict, settings: Settings, tag: str
) -> dict:
    """One ungated run of one side (a configuration probe): its timed steps as one segment."""
    result = SideRun(side, case, config, steps, 1, fx, settings, tag).finish()
    return pair_segments(result, case_warmup(case, settings), steps)[0]


def rate(case: Case, segment: dict) -> float:
    """Higher is better: trained non-pad tokens/s (SFT), pairs/s (DPO, RM) or steps/s (GRPO)
    over a segment's timed steps."""
    seconds = sum(segment["step_times"])
    if case.metric == "trained_tokens_per_s":
        return sum(segment["step_tokens"]) / seconds
    if case.metric == "seconds_per_step":
        return len(segment["step_times"]) / seconds
    return case.batch * len(segment["step_times"]) / seconds


def reported(case: Case, value: float) -> float:
    """The value a record shows: seconds per step is the inverse of the rate compared."""
    return 1.0 / value if case.metric == "seconds_per_step" else value


def effective_tokens_per_s(segment: dict) -> float:
    """Nominal throughput: the non-pad tokens each side trained (SFT/DPO/RM) or generated
    (GRPO) per second of a segment's timed steps."""
    return sum(segment["step_tokens"]) / sum(segment["step_times"])


def hw_flops_per_s(case: Case, segment: dict, fx: dict) -> float | None:
    """Hardware FLOP/s: the token positions the model really computed (padding included, a
    shared prompt once), from bench/positions.py, spread evenly over the run's steps (the
    segment's share: its steps over `run_steps`). None for GRPO (generation dominates; see
    mfu.py) or when the counter did not report."""
    counted = segment.get("positions")
    if case.name == "grpo" or not counted:
        return None
    steps = segment["step_times"]
    share = len(steps) / segment.get("run_steps", len(steps))
    return mfu.hw_flops(case.name, fx[case.model], counted) * share / sum(steps)


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
    for i in range(max(len(c) for c in sides.values())):
        order = sides.items() if i % 2 == 0 else reversed(list(sides.items()))
        for side, configs in order:
            if i < len(configs) and len(configs) > 1:
                r = run_side(side, case, configs[i], steps, fx, settings, f"probe{i}")
                probes.append({"side": side, "config": configs[i], "rate": rate(case, r),
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
    """Select, then run the two sides in ABBA order `pairs` times; returns the case's record.
    Each side is one process (bench/gate.py): its warm-up, then one segment of timed steps per
    pair, the other side's process waiting at its gate meanwhile."""
    case = CASES[name]
    started = time.perf_counter()
    fx = make_fixtures(settings.preset)
    record = case.record_name(settings.suffix)
    select = "probe" if settings.probes(name) else "fixed"
    say(f"[{record}] ({case.workload}) selecting configurations ({select})")
    pt_config, trl_config, probes = select_config(name, case, fx, settings, say)
    config = {"posttrain": pt_config, "trl": trl_config}
    warmup, steps = case_warmup(case, settings), case_steps(case, settings)
    procs: dict[str, SideRun] = {}
    results = {}
    for pair, order in enumerate(abba_order(settings.pairs)):
        for side in order:
            if side not in procs:  # its warm-up and first segment
                procs[side] = SideRun(side, case, config[side], steps, settings.pairs, fx,
                                      settings, "pairs")  # fmt: skip
            else:
                procs[side].proc.release()
            if pair < settings.pairs - 1:
                procs[side].proc.wait_stop()
            else:
                results[side] = procs[side].finish()
        if pair < settings.pairs - 1:
            say(f"  pair {pair} ({order[0][0]}{order[1][0]}) done")
    runs = {side: pair_segments(results[side], warmup, steps) for side in results}
    for pair in range(settings.pairs):
        pt, trl = (rate(case, runs[s][pair]) for s in ("posttrain", "trl"))
        say(f"  pair {pair}: posttrain {reported(case, pt):10.2f}  trl {reported(case, trl):10.2f}"
            f"  ratio {pt / trl:5.2f}")  # fmt: skip
    return summarise(case, settings, fx, peaks, runs, probes, time.perf_counter() - started)


def summarise(case, settings, fx, peaks, runs, probes, seconds) -> dict:
    """The case's record: the schema fields first (case, metric, posttrain, peer, ratio, pairs,
    hw_mfu_*, rss_*_mib, peer_settings), then the detail. `runs[side]` holds one segment of
    timed steps per pair (`pair_segments`)."""
    w, peer = case_warmup(case, settings), {"posttrain": "posttrain", "trl": "peer"}

    def med(fn) -> dict:
        return {peer[s]: statistics.median(fn(r) for r in runs[s]) for s in runs}

    pt_config, trl_config = runs["posttrain"][0]["config"], runs["trl"][0]["config"]
    effective = runs["trl"][0].get("effective") or {}
    dtype = {"posttrain": "bf16" if pt_config.get("train.mixed_precision") == "bf16" else "fp32",
             "peer": effective.get("precision") or ("bf16" if trl_config.get("bf16") else "fp32")}  # fmt: skip
    rates = {side: reported(case, v) for side, v in med(lambda r: rate(case, r)).items()}
    rss = med(lambda r: r["peak_rss_mb"])
    ratio, ratios = median_ratio([rate(case, r) for r in runs["posttrain"]],
                                 [rate(case, r) for r in runs["trl"]])  # fmt: skip
    hw = {}
    if case.name != "grpo":
        flops = med(lambda r: hw_flops_per_s(case, r, fx) or 0.0)
        hw = {s: flops[s] / peaks["bf16"] if flops[s] else None for s in flops}
    tokens = med(lambda r: statistics.mean(r["step_tokens"]))
    token_diff = None
    if case.name == "grpo":
        token_diff = generated_tokens_check(
            [t for r in runs["posttrain"] for t in r["step_tokens"]],
            [t for r in runs["trl"] for t in r["step_tokens"]], GRPO_TOKEN_TOLERANCE)  # fmt: skip
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
        "effective_tokens_per_s": med(lambda r: effective_tokens_per_s(r)),
        "tokens_per_step": tokens, "generated_tokens_diff": token_diff,
        "positions": {peer[s]: runs[s][0].get("positions") for s in runs},
        # Same batches on both sides: the same non-pad tokens per step and the same first loss
        # (GRPO trains on each side's own samples, so only the settings are the same there).
        "same_step_tokens": case.name != "grpo" and all(
            a["step_tokens"] == b["step_tokens"]
            for a, b in zip(runs["posttrain"], runs["trl"], strict=True)),
        "first_loss": {peer[s]: runs[s][0]["losses"][0] for s in runs},
        # 1-min load average when each side's process started; our own runs keep it near
        # `threads`.
        "load_average": [runs[s][0]["load"] for s in runs],
        "settings": {
            "common": common,
            "posttrain": {"config": pt_config, "dtype": dtype["posttrain"],
                          "command": " ".join(runs["posttrain"][0]["argv"][1:])},
            "peer": {**peer_settings, "dtype": dtype["peer"]},
            "probes": probes, "matmul_peak_flops": peaks,
        },
        # Each side's one process (start-up, warm-up, every pair's segment, waits at the gate).
        "process_seconds": {peer[s]: runs[s][0]["wall_s"] for s in runs},
        "process_cpu_seconds": {peer[s]: runs[s][0]["cpu_s"] for s in runs},
        "process": "one per side, paused at a gate between pairs (bench/gate.py)",
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
