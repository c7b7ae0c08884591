"""Which exceptions are the user's to fix, and the one line the CLI prints for them.

The CLI has one error boundary (`posttrain.cli.user_errors_exit`): an exception that
`user_message` recognises becomes `error: <one line>` on stderr and exit status 2; anything else
is a bug and keeps its traceback. `POSTTRAIN_DEBUG=1` shows the traceback in every case.

Recognised:
- the project's own error types (UserError and its subclasses: ConfigError, DataError,
  ModelError, ScoringError and those below), whose messages already name the key, file, row or function;
- the environment failing a write: no space left (ENOSPC, EDQUOT), a file size limit (EFBIG),
  no permission or a read-only file system, a file where a directory is to be created — also when a library (safetensors, torch.save)
  wraps the OS error in its own exception type, which we recognise by its text;
- an optional dependency that is not installed (`tensorboard`, `bitsandbytes`, ...);
- transformers refusing a checkpoint's custom code without `trust_remote_code`.

This module imports nothing heavy, so the CLI can use it before torch is loaded.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Base of errors whose message is the whole story for the user (no traceback needed)."""


class OutputPathError(UserError):
    """train.output_dir cannot hold the run (a file, not writable, too little space)."""


class MissingExtraError(UserError):
    """A feature was asked for whose optional dependency is not installed."""


# Optional dependencies by import name -> how to get them.
EXTRAS = {
    "tensorboard": "pip install 'posttrain[tensorboard]'",
    "bitsandbytes": "pip install bitsandbytes (QLoRA needs a CUDA GPU)",
    "flash_attn": "pip install flash-attn, or set model.attn_implementation=sdpa",
    "trl": "pip install 'posttrain[bench]'",
    "matplotlib": "pip install 'posttrain[plot]'",
    "wandb": "pip install 'posttrain[wandb]'",
    "mlflow": "pip install 'posttrain[mlflow]'",
    "trackio": "pip install 'posttrain[trackio]'",
}

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
# How safetensors (Rust io::Error) and torch's stream writer word the same OS failures.
_NO_SPACE_TEXT = re.compile(r"No space left on device|StorageFull|os error 28", re.IGNORECASE)
_TOO_LARGE_TEXT = re.compile(r"File too large|FileTooLarge|os error 27", re.IGNORECASE)


def debug_enabled() -> bool:
    return os.environ.get("POSTTRAIN_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """Collapse a multi-line message (library errors often have several) into one line."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    return "; ".join(parts) if parts else "(no message)"


def _chain(error: BaseException):
    """The error and its causes/contexts, outermost first (cycle-safe)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _project_types() -> tuple[type, ...]:
    # ConfigError, DataError, ModelError and ScoringError derive from UserError, so this module
    # imports none of the layers that raise them (no import cycle).
    return (UserError,)


def _write_failure(error: BaseException, output_dir: str | None) -> str | None:
    where = f" under {output_dir}" if output_dir else ""
    for item in _chain(error):
        code = getattr(item, "errno", None) if isinstance(item, OSError) else None
        name = getattr(item, "filename", None) or output_dir or "?"
        if code in _NO_SPACE or (code is None and _NO_SPACE_TEXT.search(str(item))):
            return (
                f"no space left on the device while writing {name}: free space{where} "
                "and rerun (with --resume to continue from the last checkpoint)"
            )
        if code == errno.EFBIG or (code is None and _TOO_LARGE_TEXT.search(str(item))):
            return (
                f"could not write {name}: file too large for this file system or for the "
                "file-size limit (ulimit -f)"
            )
        if code in _NO_ACCESS:
            return f"cannot access {name}: {item.strerror}"
        if code in (errno.EEXIST, errno.ENOTDIR):  # mkdir of an output directory
            return f"cannot create the directory {name}: a file of that name is in the way"
    return None


def user_message(error: BaseException, output_dir: str | None = None) -> str | None:
    """One line describing a foreseeable user error, or None for a bug.

    `output_dir` (when known) lets a write failure say where the run was writing."""
    if isinstance(error, _project_types()):
        return one_line(str(error))
    if isinstance(error, ModuleNotFoundError):
        root = (error.name or "").split(".")[0]
        if root in EXTRAS:
            return f"this feature needs the optional package {root!r}: {EXTRAS[root]}"
        return None
    written = _write_failure(error, output_dir)
    if written is not None:
        return written
    text = str(error)
    if isinstance(error, ValueError) and "trust_remote_code" in text:
        # transformers' refusal to run a checkpoint's own code; the message says which one.
        return one_line(text) + " (posttrain: set model.trust_remote_code=true if you trust it)"
    return None
