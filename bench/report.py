"""Results: bench/results/latest.jsonl (one record per case), the rich table and the ratio plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LATEST = RESULTS / "latest.jsonl"
PLOT = RESULTS / "ratios.png"


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
    records.update({r["case"]: r for r in new})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    return records


def _config(side: dict) -> str:
    config = side.get("config", {})
    parts = [f"{k.split('.')[-1]}={v}" for k, v in config.items()]
    return " ".join(parts) or "default"


def print_table(records: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the table when the output is a file or a pipe (make, CI logs).
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    table = Table(title="posttrain vs TRL (ratio > 1: posttrain better; medians over A/B pairs)")
    for name, justify in [
        ("case", "left"),
        ("metric", "left"),
        ("posttrain", "right"),
        ("TRL", "right"),
        ("ratio", "right"),
        ("pair ratios", "left"),
        ("peak RSS MiB pt / TRL", "right"),
        ("MFU pt / TRL", "right"),
    ]:
        table.add_column(name, justify=justify)
    for r in records:
        rss = r.get("peak_rss_mb")
        mfu = r.get("mfu")
        table.add_row(
            r["case"],
            r["metric"].replace("trained_tokens_per_s", "tokens/s").replace("_per_s", "/s"),
            f"{r['posttrain']:.1f}",
            f"{r['peer']:.1f}",
            f"{r['ratio']:.2f}x",
            " ".join(f"{x:.2f}" for x in r.get("pair_ratios", [])),
            f"{rss['posttrain']:.0f} / {rss['peer']:.0f}" if rss else "-",
            f"{mfu['posttrain']:.1%} / {mfu['peer']:.1%}" if mfu else "-",
        )
    console.print(table)
    for r in records:
        s = r.get("settings", {})
        if "posttrain" in s and "peer" in s:
            pt, peer, common = s["posttrain"], s["peer"], s.get("common", {})
            console.print(
                f"{r['case']}: posttrain [{_config(pt)}] ({pt.get('dtype')}) vs TRL {peer.get('version')} "
                f"[{_config(peer)} gradient_checkpointing=False] ({peer.get('dtype')}); "
                f"{common.get('batch')} {common.get('unit')}/step, max_length {common.get('max_length')}, "
                f"lr {common.get('lr')}, {common.get('warmup_steps_untimed')}+{common.get('timed_steps')} steps, "
                f"{common.get('threads')} threads; tokens/step pt {r['tokens_per_step']['posttrain']:.0f} "
                f"TRL {r['tokens_per_step']['peer']:.0f}",
                highlight=False,
                markup=False,
            )
    loads = [x for r in records for x in r.get("load_average", [])]
    if loads:
        console.print(
            f"1-min load average at run starts: {min(loads):.1f}-{max(loads):.1f} (the benchmark's own "
            "runs account for about its thread count; more means other work shared the CPUs)",
            highlight=False,
        )
    peaks = next(
        (
            r["settings"]["matmul_peak_flops"]
            for r in records
            if "matmul_peak_flops" in r.get("settings", {})
        ),
        None,
    )
    if peaks:
        console.print(
            "matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()),
            highlight=False,
        )


def plot(records: list[dict], path: Path = PLOT) -> Path:
    """Bar chart of the throughput ratio (and peak-RSS ratio TRL/posttrain) per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["case"])
    names = [r["case"] for r in records]
    speed = [r["ratio"] for r in records]
    memory = [r["peak_rss_mb"]["ratio"] if r.get("peak_rss_mb") else 0.0 for r in records]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], speed, width=0.4, label="throughput posttrain / TRL")
    ax.bar([i + 0.2 for i in x], memory, width=0.4, label="peak RSS TRL / posttrain")
    for i, r in enumerate(records):
        if r.get("target"):
            ax.hlines(r["target"], i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("ratio (> 1: posttrain better)")
    ax.set_title("posttrain vs TRL (dashed: target)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
