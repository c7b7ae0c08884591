"""Results: bench/results/latest.jsonl (one record per case), the rich table, the ratio plot and
the README performance table.

    python -m bench.report            # table + plot from latest.jsonl
    python -m bench.report --readme   # also rewrite README.md's generated performance block

Every record carries the schema fields (`SCHEMA`): case, metric, posttrain, peer, ratio (> 1:
posttrain better), pairs, hw_mfu_posttrain, hw_mfu_peer (fraction of the measured bf16 matmul
peak), rss_posttrain_mib, rss_peer_mib, peer_settings; `None` where a field does not apply
(one-process rollout benchmarks have no per-side RSS).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LATEST = RESULTS / "latest.jsonl"
RUN_INFO = RESULTS / "run_info.json"
PLOT = RESULTS / "ratios.png"
README = Path(__file__).resolve().parent.parent / "README.md"
SCHEMA = ("case", "metric", "posttrain", "peer", "ratio", "pairs", "hw_mfu_posttrain",
          "hw_mfu_peer", "rss_posttrain_mib", "rss_peer_mib", "peer_settings")  # fmt: skip
WORKLOADS = ("shared-prompt", "long", "bigvocab", "rollout")
BEGIN, END = (
    "<!-- bench table: begin (python -m bench.report --readme) -->",
    "<!-- bench table: end -->",
)


def with_schema(record: dict) -> dict:
    """The record with every SCHEMA field present (None where it does not apply) and first."""
    if "workload" not in record:
        record["workload"] = "rollout" if record["case"].startswith("rollout") else "shared-prompt"
    return {**{k: record.get(k) for k in SCHEMA}, **record}


def run_info(threads: int, peaks: dict) -> dict:
    """Date, machine and versions of this run (written once per run to RUN_INFO)."""
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [x.split(":", 1)[1].strip() for x in cpuinfo.read_text().splitlines()
                 if x.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=README.parent).stdout.strip()  # fmt: skip
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version,
            "python": platform.python_version(), "commit": commit,
            "matmul_peak_gflops": {k: round(v / 1e9) for k, v in peaks.items()}}  # fmt: skip


def load_records(path: Path = LATEST) -> dict[str, dict]:
    """Records by case; a later line for the same case replaces an earlier one."""
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["case"]] = record
    return records


def save_records(new: list[dict], path: Path = LATEST) -> dict[str, dict]:
    """Merge `new` into the file (including lines other scripts appended meanwhile)."""
    records = load_records(path)
    records.update({r["case"]: with_schema(r) for r in new})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    return records


def _config(side: dict) -> str:
    config = side.get("config", {})
    parts = [f"{k.split('.')[-1]}={v}" for k, v in config.items()]
    return " ".join(parts) or "default"


def _pct(x) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) else "-"


def _mib(x) -> str:
    return f"{x:.0f}" if isinstance(x, (int, float)) else "-"


def _metric(r: dict) -> str:
    return {"trained_tokens_per_s": "trained tokens/s", "pairs_per_s": "pairs/s",
            "seconds_per_step": "s/step", "generated_tokens_per_s": "generated tokens/s"}.get(
                r["metric"], r["metric"])  # fmt: skip


def _ordered(records: list[dict]) -> list[dict]:
    rank = {w: i for i, w in enumerate(WORKLOADS)}
    return sorted(records, key=lambda r: (rank.get(r.get("workload"), 9), r["case"]))


def print_table(records: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the table when the output is a file or a pipe (make, CI logs).
    console = console or Console(width=None if sys.stdout.isatty() else 170)
    table = Table(
        title="posttrain vs TRL (ratio > 1: posttrain better; median of ABBA pair ratios)"
    )
    for name in ("workload", "case", "metric", "posttrain", "peer", "ratio", "pairs",
                 "hw MFU pt / peer", "peak RSS MiB pt / peer"):  # fmt: skip
        table.add_column(
            name, justify="left" if name in ("workload", "case", "metric") else "right"
        )
    for r in _ordered([with_schema(dict(r)) for r in records]):
        table.add_row(r["workload"], r["case"], _metric(r), f"{r['posttrain']:.2f}",
                      f"{r['peer']:.2f}", f"{r['ratio']:.2f}x", str(r["pairs"] or "-"),
                      f"{_pct(r['hw_mfu_posttrain'])} / {_pct(r['hw_mfu_peer'])}",
                      f"{_mib(r['rss_posttrain_mib'])} / {_mib(r['rss_peer_mib'])}")  # fmt: skip
    console.print(table)
    console.print("hw MFU: % of measured bf16 matmul peak (token positions each side computed, "
                  "padding included, shared prompts once)", highlight=False)  # fmt: skip
    for r in records:
        s = r.get("settings", {})
        if "posttrain" in s and "peer" in s:
            eff = (r.get("peer_settings") or {}).get("effective", {})
            console.print(
                f"{r['case']}: posttrain [{_config(s['posttrain'])}] vs TRL "
                f"{(r.get('peer_settings') or {}).get('version')} [{_config(s['peer'])}] "
                f"effective: precision={eff.get('precision')} "
                f"activation_checkpointing={eff.get('activation_checkpointing')} "
                f"padding_free={eff.get('padding_free_in_use', eff.get('padding_free'))} "
                f"packing={eff.get('packing')} micro_batch={eff.get('per_device_train_batch_size')} "
                f"x accum={eff.get('gradient_accumulation_steps')}",
                highlight=False, markup=False,
            )  # fmt: skip
    loads = [x for r in records for x in r.get("load_average", [])]
    if loads:
        console.print(
            f"1-min load average at run starts: {min(loads):.1f}-{max(loads):.1f} (the benchmark's own "
            "runs account for about its thread count; more means other work shared the CPUs)",
            highlight=False,
        )


def plot(records: list[dict], path: Path = PLOT) -> Path:
    """One panel per workload: throughput ratio and peak-RSS ratio (TRL / posttrain) per case,
    targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _ordered([with_schema(dict(r)) for r in records])
    groups = [(w, [r for r in records if r["workload"] == w]) for w in WORKLOADS]
    groups = [(w, rs) for w, rs in groups if rs]
    if not groups:
        return path
    widths = [max(len(rs), 1.5) for _, rs in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(1.2 * sum(widths) + 2, 4.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)  # fmt: skip
    for ax, (workload, rs) in zip(axes[0], groups, strict=True):
        x = range(len(rs))
        memory = [r["rss_peer_mib"] / r["rss_posttrain_mib"] if r["rss_posttrain_mib"] else 0.0
                  for r in rs]  # fmt: skip
        ax.bar([i - 0.2 for i in x], [r["ratio"] for r in rs], width=0.4,
               label="throughput posttrain / peer")  # fmt: skip
        ax.bar([i + 0.2 for i in x], memory, width=0.4, label="peak RSS peer / posttrain")
        for i, r in enumerate(rs):
            if r.get("target"):
                ax.hlines(r["target"], i - 0.45, i + 0.05, colors="k", linestyles="dashed", lw=1)
            if r.get("rss_target"):
                ax.hlines(
                    r["rss_target"], i - 0.05, i + 0.45, colors="k", linestyles="dotted", lw=1
                )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(x), [r["case"] for r in rs], rotation=30, ha="right", fontsize=8)
        ax.set_title(workload, fontsize=10)
    axes[0][0].set_ylabel("ratio (> 1: posttrain better)")
    axes[0][0].legend(fontsize=7)
    info = load_run_info()
    fig.suptitle("posttrain vs TRL (dashed: throughput target, dotted: memory target)"
                 + (f" - {info['date']}, {info['threads']} threads" if info else ""), fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_run_info() -> dict | None:
    return json.loads(RUN_INFO.read_text()) if RUN_INFO.is_file() else None


# One sentence per lever: the work it avoids (README, under the table).
LEVERS = (
    "SFT packing (`data.packing`): examples are packed first-fit into rows of up to "
    "`data.max_length` tokens under a block mask, so only the tails of the shorter rows are "
    "padding; the attention kernel still computes each whole row (the mask hides pairs, it does "
    "not skip them).",
    "DPO/RM prefix-shared pairs (`data.packing`): `[prompt | chosen | rejected]` is one segment, "
    "so each prompt is computed once instead of twice and nothing is padded.",
    "GRPO shared-prompt forward (`grpo.share_prompt_forward`): the training forward computes "
    "each prompt once for its n completions instead of n times, where that costs less: after a "
    "short prompt, long completions make the group's row attend over (P + n·C)² pairs, and "
    "the n plain rows are run instead (posttrain/models/forward_cost.py).",
    "Rollout prompt sharing (posttrain/rollout/prefix_shared.py): prefill once per prompt and "
    "decode attention reads each prompt's keys/values once per group, not from n copies; "
    "finished rows leave the batch, so no step decodes padding.",
    "Speculative rollouts (`speculative: auto`): MTP drafts verified in one forward save "
    "sequential forwards at small batch, and decoding goes plain at or above the break-even "
    "batch, where the wider verify forward costs more than it saves.",
    "Log-probs without full logits (chunked LM head, posttrain/): the fp32 "
    "[batch, length, vocab] logits tensor is never materialised, which is what the bigvocab "
    "rows' memory measures.",
)


def readme_table(records: list[dict], info: dict | None) -> str:
    """The README's generated block: run line, one table for all workloads, levers."""
    records = _ordered([with_schema(dict(r)) for r in records])
    lines = []
    if info:
        peaks = ", ".join(f"{k} {v}" for k, v in info["matmul_peak_gflops"].items())
        lines += [f"Run {info['date']} (commit {info['commit']}): {info['cpu']}, "
                  f"{info['threads']} threads per side; torch {info['torch']}, transformers "
                  f"{info['transformers']}, TRL {info['trl']}, Python {info['python']}; "
                  f"measured matmul peak {peaks} GFLOP/s.", ""]  # fmt: skip
    lines += ["| workload | case | metric | posttrain | TRL / peer | ratio | target | pairs | "
              "hw MFU pt / TRL | peak RSS MiB pt / TRL |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        target = f"{r['target']:g}x" if r.get("target") else "-"
        if r.get("rss_target"):
            target += f", RSS ≤ {1 / r['rss_target']:g}x TRL's"
        lines.append(f"| {r['workload']} | {r['case']} | {_metric(r)} | {r['posttrain']:.2f} | "
                     f"{r['peer']:.2f} | {r['ratio']:.2f}x | {target} | {r['pairs'] or '-'} | "
                     f"{_pct(r['hw_mfu_posttrain'])} / {_pct(r['hw_mfu_peer'])} | "
                     f"{_mib(r['rss_posttrain_mib'])} / {_mib(r['rss_peer_mib'])} |")  # fmt: skip
    lines += ["", "hw MFU: % of measured bf16 matmul peak (the best of five 2048×2048 bf16 "
              "`torch.matmul` calls at the benchmark's thread count), counting the token "
              "positions each side's model really computed: padding included, a shared prompt "
              "once (bench/positions.py). The nominal rate is `effective_tokens_per_s` in the "
              "records.", "", "![ratios](bench/results/ratios.png)", "", "What each lever avoids:"]  # fmt: skip
    lines += [f"- {lever}" for lever in LEVERS]
    return "\n".join(lines)


def write_readme(records: list[dict], info: dict | None, readme: Path = README) -> None:
    """Replace the block between BEGIN and END in README.md (added after the Performance
    heading if absent)."""
    text = readme.read_text()
    block = f"{BEGIN}\n{readme_table(records, info)}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        heading = "## Performance (posttrain vs TRL)\n"
        if heading not in text:
            raise SystemExit(f"{readme}: no '{heading.strip()}' heading to put the table under")
        text = text.replace(heading, f"{heading}\n{block}\n", 1)
    readme.write_text(text)


if __name__ == "__main__":
    records = list(load_records().values())
    print_table(records)
    print(f"plot: {plot(records)}")
    if "--readme" in sys.argv:
        write_readme(records, load_run_info())
        print(f"rewrote the generated block of {README}")
