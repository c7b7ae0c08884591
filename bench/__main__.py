"""`python -m bench [--quick] [--cases sft,dpo,...] [--pairs 5] [--device cpu|cuda]`

Creates the fixtures, measures the matmul peak, runs every case (posttrain and TRL in ABBA
order, in separate processes), prints the table, writes bench/results/latest.jsonl and the plot.
A full run (no --cases, not --quick) rewrites latest.jsonl from scratch; a quick run or a run of
chosen cases replaces only their records. `--quick` is the development loop: the tiny preset, short runs, first-listed
configurations.
"""

from __future__ import annotations

import argparse
import json
import time

from bench import harness, mfu, report

FULL_CASES = (
    "sft,dpo,rm,grpo,rollout,speculative,"  # shared-prompt workload + rollout engine
    "sft_long,dpo_long,rm_long,grpo_long,"  # long workload
    "sft_bigvocab,grpo_bigvocab"  # real vocabulary
)
# The development loop (<= 5 min): one offline trainer, the online trainer, the engine (dpo and
# rm share sft's harness path; `--quick --cases dpo` adds one).
QUICK_CASES = "sft,grpo,rollout"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny preset, short runs, no configuration probes"
    )
    p.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated, from {sorted(harness.CASES) + sorted(harness.EXTERNAL)} "
        f"(default: {FULL_CASES}; with --quick: {QUICK_CASES})",
    )
    p.add_argument(
        "--preset",
        choices=["tiny", "small"],
        default=None,
        help="default: small (tiny with --quick)",
    )
    p.add_argument("--pairs", type=int, default=5, help="ABBA pairs per case (at least 5)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per run (default 2; cases may set fewer)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per run (default 1; cases may set 0)",
    )
    p.add_argument(
        "--select",
        choices=["probe", "fixed"],
        default=None,
        help="probe every candidate configuration (default) or take the first (quick)",
    )
    p.add_argument(
        "--probe",
        default="",
        help="with --select probe: probe only these comma-separated cases, take the first "
        "candidate elsewhere (default: probe every case)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.pairs < 5:
        raise SystemExit("--pairs must be at least 5 (the ratio is a median over pairs)")
    chosen = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    cases = [c.strip() for c in chosen.split(",") if c.strip()]
    unknown = [c for c in cases if c not in harness.CASES and c not in harness.EXTERNAL]
    if unknown:
        raise SystemExit(
            f"unknown case(s) {unknown}; known: {sorted(harness.CASES) + sorted(harness.EXTERNAL)}"
        )
    preset = args.preset or ("tiny" if args.quick else "small")
    not_tiny = [
        c for c in cases if c in harness.CASES and harness.CASES[c].workload != "shared-prompt"
    ]
    if preset != "small" and not_tiny:
        raise SystemExit(
            f"{not_tiny}: the long and bigvocab workloads exist for --preset small only"
        )
    settings = harness.Settings(
        preset=preset,
        pairs=args.pairs,
        warmup=args.warmup if args.warmup is not None else 1,
        steps=args.steps if args.steps is not None else 2,
        probe_steps=1,
        threads=args.threads,
        device=args.device,
        select=args.select or ("fixed" if args.quick else "probe"),
        probe_only=tuple(c.strip() for c in args.probe.split(",") if c.strip()),
    )
    started = time.perf_counter()
    # A full run (not --quick, no --cases) starts the results file afresh: no record of an
    # earlier run survives. A quick or partial run replaces only the records of its cases.
    full = args.cases is None and not args.quick
    if full:
        report.LATEST.unlink(missing_ok=True)
    peaks = {
        dtype: mfu.measure_peak(dtype, settings.threads, device=settings.device)
        for dtype in ("fp32", "bf16")
    }
    print(
        "matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    if full:  # date, machine and versions of the run the README table quotes
        report.RUN_INFO.parent.mkdir(parents=True, exist_ok=True)
        report.RUN_INFO.write_text(json.dumps(report.run_info(settings.threads, peaks), indent=1))
    done, timings = [], {}
    for name in cases:
        case_started = time.perf_counter()
        if name in harness.EXTERNAL:
            names = harness.EXTERNAL[name](settings, say=lambda m: print(m, flush=True))
            records = report.load_records()
            done += [records[k] for k in names if k in records]
        else:
            record = harness.run_case(name, settings, peaks, say=lambda m: print(m, flush=True))
            report.save_records([record])  # after every case, so a later failure keeps it
            done.append(record)
        timings[name] = time.perf_counter() - case_started
        print(f"[{name}] {timings[name]:.0f} s", flush=True)
    report.print_table(done)
    path = report.plot(list(report.load_records().values()))
    print("seconds per case: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"results: {report.LATEST}  plot: {path}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
