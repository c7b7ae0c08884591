"""Bad input gets one clear line on stderr, exit status 2, and no traceback.

Most cases run the real typer app in-process (CliRunner) to keep the suite fast; one runs a
fresh `python -m posttrain` process to show the same holds for a user's shell.
"""

import pytest
from cli_helpers import run_cli, sft_overrides


def run_inprocess(*args):
    """The typer app in this process; returns an object shaped like CompletedProcess."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from posttrain.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stderr=result.stderr, stdout=result.stdout)


def check_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture()
def base(tiny_model_dir, arithmetic_dir, tmp_path):
    return sft_overrides(tiny_model_dir, arithmetic_dir, tmp_path / "out")


def test_missing_data_file(base, tmp_path):
    r = run_inprocess(
        "sft", "recipes/sft_tiny.yaml", *base, f"data.train_path={tmp_path}/none.jsonl"
    )
    check_error(r, "data file not found", "none.jsonl")


def test_malformed_jsonl_line(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    check_error(
        run_cli("sft", "recipes/sft_tiny.yaml", *base, f"data.train_path={bad}"),
        "bad.jsonl:2",
        "malformed JSON",
    )


def test_missing_column(base, tmp_path):
    bad = tmp_path / "cols.jsonl"
    bad.write_text('{"question": "a", "reply": "b"}\n')
    check_error(
        run_cli("sft", "recipes/sft_tiny.yaml", *base, f"data.train_path={bad}"),
        "missing column",
        "'messages'",
        "found: question, reply",
    )


def test_unknown_recipe_key(base):
    check_error(
        run_inprocess("sft", "recipes/sft_tiny.yaml", *base, "optim.learning_rate=1e-3"),
        "unknown key 'optim.learning_rate'",
    )
    check_error(
        run_inprocess("sft", "recipes/sft_tiny.yaml", *base, "train.max_step=3"),
        "did you mean 'train.max_steps'",
    )


def test_model_path_does_not_exist(base, tmp_path):
    check_error(
        run_cli("sft", "recipes/sft_tiny.yaml", *base, f"model.name_or_path={tmp_path}/nomodel"),
        "model path does not exist",
        "nomodel",
    )


def test_missing_recipe(base):
    check_error(run_inprocess("sft", "recipes/nope.yaml"), "recipe file not found")


def test_fp16_on_cpu_is_a_clear_error(base):
    check_error(
        run_inprocess("sft", "recipes/sft_tiny.yaml", *base, "train.mixed_precision=fp16"),
        "fp16",
        "CUDA",
    )


def test_eval_errors(tmp_path, arithmetic_dir):
    check_error(
        run_inprocess("eval", tmp_path / "nomodel", arithmetic_dir / "rl_test.jsonl"),
        "model path does not exist",
    )
    check_error(
        run_inprocess("eval", tmp_path, arithmetic_dir / "preference_test.jsonl"),
        "exact_match needs a reference: an 'answer' or 'completion' column",
        "found: prompt, chosen, rejected",
    )


def test_unknown_demo_stage():
    check_error(run_inprocess("demo", "--stages", "sft,magic"), "unknown demo stage")
    check_error(run_inprocess("demo", "--stages", "ppo_rm,rm"), "list rm before it")
