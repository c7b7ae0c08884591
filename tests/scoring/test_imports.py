"""Every scoring module imports, and the package exports what it lists."""

from __future__ import annotations

import importlib
import pkgutil

import posttrain.scoring


def test_every_module_imports_and_every_export_exists():
    for module in pkgutil.iter_modules(posttrain.scoring.__path__):
        importlib.import_module(f"posttrain.scoring.{module.name}")
    for name in posttrain.scoring.__all__:
        assert getattr(posttrain.scoring, name) is not None, name
