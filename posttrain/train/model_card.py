"""The model card written as `final/README.md`: what was trained from what, on which data, with
which recipe, and where it ended. The Hub shows it as the model's page (`push_to_hub`); the
YAML header holds the Hub's metadata keys (`base_model` only when the start was a hub id: a
local path means nothing there)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from posttrain.config import to_dict
from posttrain.data.sources import eval_source, train_sources


def _is_hub_id(name: str) -> bool:
    return not Path(name).expanduser().exists() and name.count("/") == 1


def _base_model(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _data_lines(data) -> list[str]:
    """One line per data source: path (absolute when local), split and subset when set, and
    the share of a mixture."""
    sources = [("train", s) for s in train_sources(data)]
    held_out = eval_source(data)
    if held_out is not None:
        sources.append(("eval", held_out))
    total = sum(s.weight for kind, s in sources if kind == "train")
    lines = []
    for kind, source in sources:
        details = [f"split `{source.split}`"] if source.split else []
        details += [f"subset `{source.subset}`"] if source.subset else []
        if kind == "train" and len(sources) > 1 + (held_out is not None):
            details.append(f"weight {source.weight / total:.2g}")
        suffix = f" ({', '.join(details)})" if details else ""
        lines.append(f"- **{kind} data**: `{_base_model(source.path)}`{suffix}")
    return lines


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def model_card(cfg, algorithm: str, steps: int, metrics: dict | None) -> str:
    """The card as Markdown text (metrics: the last logged ones, eval/* included)."""
    base = _base_model(cfg.model.name_or_path)
    header = {"library_name": "transformers", "tags": ["posttrain", algorithm]}
    if _is_hub_id(cfg.model.name_or_path):
        header["base_model"] = cfg.model.name_or_path
    adapter = cfg.model.lora.r > 0
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(cfg.train.output_dir).name}",
        "",
        f"Trained with posttrain `{algorithm}` for {steps} optimizer steps.",
        "",
        f"- **Base model**: `{base}`",
        f"- **Algorithm**: `{algorithm}`"
        + (f" (LoRA adapter, r={cfg.model.lora.r})" if adapter else ""),
        *_data_lines(cfg.data),
        "",
        "## Final metrics",
        "",
    ]
    shown = {
        k: v
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))
    }
    if shown:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in sorted(shown.items())]
    else:
        lines.append("(none logged)")
    load = "PeftModel.from_pretrained(base, path)" if adapter else "from_pretrained(path)"
    lines += [
        "",
        "## Use",
        "",
        f"`{load}` on this directory (transformers"
        + (" + peft" if adapter else "")
        + "); `posttrain eval THIS_DIR DATA.jsonl` scores it.",
        "",
        "## Recipe (resolved)",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(cfg), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
