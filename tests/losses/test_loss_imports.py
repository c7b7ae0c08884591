"""`posttrain.losses` is pure: every module imports only torch, the stdlib and itself."""

import ast
import importlib
from pathlib import Path

import posttrain.losses

PACKAGE = Path(posttrain.losses.__file__).parent
ALLOWED_ROOTS = {"__future__", "collections", "dataclasses", "math", "typing", "torch"}


def test_losses_import_only_torch_and_stdlib():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 11
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                ok = name.split(".")[0] in ALLOWED_ROOTS or name.startswith("posttrain.losses")
                assert ok, f"{path.name} imports {name}"
        importlib.import_module(f"posttrain.losses.{path.stem}")  # and it does import


def test_public_names_exist():
    for name in posttrain.losses.__all__:
        assert hasattr(posttrain.losses, name), name
