"""Fail fast, in one line, when a name that is not a local path needs the Hugging Face hub and the
hub cannot be reached.

Without this, `datasets.load_dataset` / `from_pretrained` on a machine with no network retry for
about a minute and end in a multi-line traceback. In offline mode (HF_HUB_OFFLINE=1) the
libraries only look in the local cache, which is quick, so the check steps aside there and the
caller turns the library's "not in the cache" error into one line.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


def offline() -> bool:
    """The libraries' offline mode: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub
    read them at import (what from_pretrained and load_dataset will do), or
    HF_DATASETS_OFFLINE."""
    from huggingface_hub import constants

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reach_error(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why `url`'s host cannot be reached (one short TCP connect), or None when it can."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"cannot reach {url} ({e.strerror or e})"


@functools.cache
def unreachable_reason() -> str | None:
    """Why the hub endpoint cannot be reached (checked once per process), or None when it can."""
    return reach_error(endpoint())


def require_hub(name: str, what: str, error: type[Exception]) -> None:
    """Raise `error` with one line when `name` (a hub id of `what`) would need a network that is
    not there. Offline mode passes: the libraries then read the local cache, quickly."""
    if offline():
        return
    reason = unreachable_reason()
    if reason is not None:
        raise error(
            f"{name}: not a local {what}, and the hub is unreachable: {reason}; check the path, "
            "or set HF_HUB_OFFLINE=1 to use a copy in the local Hugging Face cache"
        )


def offline_hint() -> str:
    return " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline() else ""
