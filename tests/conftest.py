"""Shared fixtures: a tiny model and the bundled task, made once per test session on disk and
loaded back through from_pretrained, exactly as a user's checkpoint would be."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenised-data caches of the tests' runs (and of the CLI processes they start) go to a
# directory of this session, not the user's ~/.cache, and are removed at exit.
if "HF_DATASETS_CACHE" not in os.environ:
    _datasets_cache = tempfile.mkdtemp(prefix="posttrain-tests-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _datasets_cache
    atexit.register(shutil.rmtree, _datasets_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from posttrain.models.presets import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def arithmetic_dir(tmp_path_factory) -> Path:
    from posttrain.data.arithmetic import make_arithmetic

    out = tmp_path_factory.mktemp("data") / "arithmetic"
    make_arithmetic(out, n=2000, n_test=200, seed=0)
    return out
