"""Sharded training on CUDA GPUs: DeepSpeed ZeRO-2/3 and FSDP2 in bf16. These need GPUs (and
the deepspeed extra) and are skipped, with the reason, everywhere else; the CPU tests in
test_sharding.py cover FSDP2 on gloo."""

import json

import pytest
import torch
from cli_helpers import run_torchrun, sft_overrides

pytestmark = pytest.mark.multiprocess

GPUS = torch.cuda.device_count()


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs (DeepSpeed/FSDP2 on GPU)")


@needs_two_gpus
@pytest.mark.skipif(not _deepspeed_available(), reason="needs the deepspeed extra")
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_sft_trains_and_saves_a_plain_checkpoint(
    stage, tiny_model_dir, arithmetic_dir, tmp_path
):
    out = tmp_path / stage
    args = sft_overrides(
        tiny_model_dir,
        arithmetic_dir,
        out,
        **{"train.sharding": stage, "train.batch_size": 4, "train.mixed_precision": "bf16"},
    )
    result = run_torchrun("sft", "recipes/sft_tiny.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["sharding"] == stage
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


@needs_two_gpus
def test_fsdp2_bf16_sft_on_gpus(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "fsdp2"
    args = sft_overrides(
        tiny_model_dir,
        arithmetic_dir,
        out,
        **{"train.sharding": "fsdp2", "train.batch_size": 4, "train.mixed_precision": "bf16"},
    )
    result = run_torchrun("sft", "recipes/sft_tiny.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["sharding"] == "fsdp2"
    assert summary["param_bytes_per_rank"] <= 0.6 * summary["param_bytes_total"]
