"""Atomic checkpoints: everything is written to a temporary directory, then renamed.

A rename within one file system is atomic, so `checkpoints/step-000100` either exists complete
or not at all; a process killed mid-save leaves only a `.tmp-*` directory, which the next run
ignores and removes. Accelerate's save_state writes the model (safetensors), optimizer,
GradScaler, RNG states of every process and registered objects (scheduler, loop state); with
`train.save_hf_checkpoints` also the model in Hugging Face format (`step-N/hf/`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

PREFIX = "step-"
# Test hook: POSTTRAIN_FAULT_INJECT="sigkill_during_save:STEP", "sigkill_after_save:STEP" or
# "sigkill_during_final:STEP" kills this process with SIGKILL at that point of the save of STEP. It is how the resume tests
# reproduce a crash deterministically; unset, it costs one environment lookup per save.
FAULT_ENV = "POSTTRAIN_FAULT_INJECT"
COMPLETE_MARKER = "complete.json"
HF_DIR = "hf"  # step-N/hf: the model in Hugging Face format (train.save_hf_checkpoints)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    keep: int,
    extra_files: dict[str, str] | None = None,
    write_hf: Callable[[Path], None] | None = None,
) -> Path:
    """Save the full training state for `step`; every process must call this. `write_hf(dir)`
    (train.save_hf_checkpoints) also writes the model as a Hugging Face checkpoint into
    `step-N/hf/`, inside the same atomic rename, so `from_pretrained(step-N/hf)` loads it."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    _maybe_fault("sigkill_during_save", step)
    if accelerator.is_main_process:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if write_hf is not None:
            write_hf(tmp / HF_DIR)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(output_dir, keep)
    accelerator.wait_for_everyone()
    _maybe_fault("sigkill_after_save", step)
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    accelerator.load_state(str(path))
    return json.loads((path / COMPLETE_MARKER).read_text())["step"]


def save_final(
    accelerator: Accelerator, output_dir: str | Path, step: int, write: Callable[[Path], None]
) -> Path:
    """`output_dir/final` written atomically: `write(tmp)` fills a temporary directory on the
    main process, which then replaces any previous final/ by two renames (the old one is
    parked as .old-final until the new one is in place). Every process must call this."""
    out = Path(output_dir)
    final, tmp, old = out / "final", out / ".tmp-final", out / ".old-final"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        _maybe_fault("sigkill_during_final", step)
        _fsync_dir(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(out)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Remove what a killed save left behind; a final/ parked as .old-final while its
    replacement was renamed in is put back if the replacement never arrived."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
    out = Path(output_dir)
    shutil.rmtree(out / ".tmp-final", ignore_errors=True)
    old = out / ".old-final"
    if old.is_dir():
        if (out / "final").exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out / "final")


def _prune(output_dir: str | Path, keep: int) -> None:
    found = list_checkpoints(output_dir)
    for old in found[: max(len(found) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _maybe_fault(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
