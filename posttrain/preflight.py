"""Checks the CLI runs after loading a recipe and before training, so that mistakes that would
otherwise surface minutes in (at the first save) or as a library traceback are one-line errors
up front: an unusable output directory, too little disk space, a checkpoint with custom code
without trust_remote_code, a missing optional package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from posttrain.errors import OutputPathError
from posttrain.models.loading import ModelError
from posttrain.train.trackers import check_trackers

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def check_output_dir(output_dir: str | Path, needed_bytes: int = 0) -> None:
    """train.output_dir must be (or become) a writable directory with room for a checkpoint."""
    path = Path(output_dir)
    for parent in [path, *path.parents]:  # the first existing one decides
        if parent.exists():
            if not parent.is_dir():
                what = "train.output_dir" if parent == path else f"its parent {parent}"
                raise OutputPathError(
                    f"train.output_dir={path}: {what} exists and is a file, not a directory"
                )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".posttrain-probe-"):
            pass
    except OSError as e:
        raise OutputPathError(
            f"train.output_dir={path} is not writable: {e.strerror or e}"
        ) from None
    free = shutil.disk_usage(path).free
    if needed_bytes and free < needed_bytes:
        raise OutputPathError(
            f"train.output_dir={path}: only {free / 2**20:.0f} MiB free on its file system; "
            f"a checkpoint of this model needs about {needed_bytes / 2**20:.0f} MiB"
        )


def checkpoint_bytes(model_path: str, lora: bool) -> int:
    """A lower bound on one checkpoint's size from the local weights (0 when unknown).

    A full fine-tuning checkpoint holds the weights and AdamW's two moments (≈ 3× the fp32
    weights); a LoRA checkpoint is small, so it is not estimated."""
    path = Path(model_path)
    if lora or not path.is_dir():
        return 0
    weights = sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    return 3 * weights


def check_remote_code(model_path: str, trust_remote_code: bool, key: str) -> None:
    """Refuse, in one line, a local checkpoint that only loads with its own code: an `auto_map`
    in config.json and a model_type transformers does not know. (With a known model_type,
    transformers ignores auto_map when trust_remote_code is off and loads its own class.)"""
    if trust_remote_code:
        return
    try:
        meta = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a local checkpoint, or unreadable: the loader reports it properly
    if not isinstance(meta, dict) or not meta.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if meta.get("model_type") in CONFIG_MAPPING:
        return
    raise ModelError(
        f"{key}={model_path} needs its own code (auto_map in config.json, model_type "
        f"{meta.get('model_type')!r} unknown to transformers); it runs only with "
        "model.trust_remote_code=true — set it if you trust the source"
    )


def check_extras(cfg) -> None:
    """Every tracker of logging.report_to (and logging.tensorboard) is installed."""
    check_trackers(cfg.logging)


def preflight(cfg) -> None:
    """Every check above for a loaded recipe."""
    check_extras(cfg)
    check_remote_code(cfg.model.name_or_path, cfg.model.trust_remote_code, "model.name_or_path")
    check_output_dir(
        cfg.train.output_dir, checkpoint_bytes(cfg.model.name_or_path, cfg.model.lora.r > 0)
    )
