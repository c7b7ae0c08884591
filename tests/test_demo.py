"""The demo's bar (slow: minutes). `make test-slow` runs it; `make demo` is the same job."""

import json

import pytest
from cli_helpers import run_cli

pytestmark = pytest.mark.slow


def test_demo_sft_reaches_90_percent(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path), "--stages", "sft", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    (record,) = json.loads((tmp_path / "demo_summary.json").read_text())
    assert record["stage"] == "sft"
    assert record["accuracy_after"] >= 0.90, record
    assert record["accuracy_before"] < 0.05
    assert {"accuracy_before", "accuracy_after", "seconds"} <= record.keys()
