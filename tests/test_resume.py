"""Resume: a run stopped after a checkpoint and resumed ends with the same weights as an
uninterrupted run; a run SIGKILLed in the middle of a save resumes from the last complete one."""

import json

import torch
from cli_helpers import run_cli, sft_overrides
from safetensors.torch import load_file

STEPS = 6


def run(tiny_model_dir, arithmetic_dir, out, *extra, env=None):
    args = sft_overrides(
        tiny_model_dir,
        arithmetic_dir,
        out,
        **{
            "train.max_steps": STEPS,
            "train.save_every": 2,
            "optim.lr": 3e-3,
            "train.keep_checkpoints": 3,
        },
    )
    return run_cli("sft", "recipes/sft_tiny.yaml", *args, *extra, env=env)


def weights(out):
    return load_file(out / "final" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def full_and_killed_then_resumed(tiny_model_dir, arithmetic_dir, tmp_path, *extra):
    """An uninterrupted run (tmp_path/full) and one SIGKILLed right after its step-2
    checkpoint, then resumed (tmp_path/stopped); asserts they end with the same weights."""
    full = run(tiny_model_dir, arithmetic_dir, tmp_path / "full", *extra)
    assert full.returncode == 0, full.stderr
    stopped = run(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path / "stopped",
        *extra,
        env={"POSTTRAIN_FAULT_INJECT": "sigkill_after_save:2"},
    )
    assert stopped.returncode == -9
    assert not (tmp_path / "stopped" / "final").exists()
    resumed = run(tiny_model_dir, arithmetic_dir, tmp_path / "stopped", *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "stopped"))


def test_resume_matches_uninterrupted_and_survives_kill_mid_save(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    full_and_killed_then_resumed(tiny_model_dir, arithmetic_dir, tmp_path)

    # Killed in the middle of writing the step-4 checkpoint: step 4 must not count as saved.
    crashed = run(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path / "crashed",
        env={"POSTTRAIN_FAULT_INJECT": "sigkill_during_save:4"},
    )
    assert crashed.returncode == -9
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-0000004", "step-0000002"]
    resumed = run(tiny_model_dir, arithmetic_dir, tmp_path / "crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "step-0000002" in resumed.stdout + resumed.stderr
    assert not (ckpts / ".tmp-step-0000004").exists()
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "crashed"))

    # Steps 3-4 were logged before the crash and again after the resume from step 2: the
    # metrics file keeps each step once (the lines of the lost run are moved aside).
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, STEPS + 1))
    dropped = (tmp_path / "crashed" / "metrics.dropped.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in dropped] == [3, 4]


def test_kill_while_writing_final_leaves_no_half_written_final(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    """final/ is written in a temporary directory and renamed: a kill in the middle leaves no
    final/ (not a config-only one), and --resume writes a complete one."""
    out = tmp_path / "run"
    killed = run(
        tiny_model_dir,
        arithmetic_dir,
        out,
        env={"POSTTRAIN_FAULT_INJECT": f"sigkill_during_final:{STEPS}"},
    )
    assert killed.returncode == -9
    assert not (out / "final").exists() and (out / ".tmp-final" / "config.json").exists()
    resumed = run(tiny_model_dir, arithmetic_dir, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / ".tmp-final").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # a complete checkpoint


def test_resume_with_mtp_heads_matches_uninterrupted(tiny_model_dir, arithmetic_dir, tmp_path):
    """The MTP heads (their weights and AdamW state) are part of the checkpoint too."""
    mtp = ("model.mtp.kind=deepseek", "model.mtp.depth=2")
    full_and_killed_then_resumed(tiny_model_dir, arithmetic_dir, tmp_path, *mtp)
    heads = [
        load_file(tmp_path / d / "final" / "mtp_heads.safetensors") for d in ("full", "stopped")
    ]
    assert heads[0]  # the heads were saved and trained
    assert_same_weights(*heads)
