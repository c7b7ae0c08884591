"""The benchmark harness's own logic (bench/): ABBA order, the median pair ratio, the record
schema, the GRPO generated-token check, identical GRPO prompts on both sides, the position
counter behind the hardware MFU, and the TRL command line. No timing is asserted."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench import harness, mfu, report
from bench.positions import PositionCounter
from bench.posttrain_runner import in_sampler_order
from bench.trl_runner import command as trl_command
from posttrain.algorithms.base import StepSampler


def test_abba_order_alternates_who_runs_first():
    order = harness.abba_order(5)
    assert order == [("posttrain", "trl"), ("trl", "posttrain"), ("posttrain", "trl"),
                     ("trl", "posttrain"), ("posttrain", "trl")]  # fmt: skip


def test_ratio_is_the_median_of_pair_ratios():
    # pair ratios 2, 1, 4, 3, 10 -> median 3; the ratio of medians would be 10/3.33 = 3.0 too
    # by chance, so use rates whose median ratio differs from the ratio of medians
    pt, peer = [2.0, 1.0, 8.0, 3.0, 10.0], [1.0, 1.0, 2.0, 1.0, 1.0]
    ratio, ratios = harness.median_ratio(pt, peer)
    assert ratios == [2.0, 1.0, 4.0, 3.0, 10.0] and ratio == 3.0
    with pytest.raises(ValueError):
        harness.median_ratio([1.0], [1.0, 2.0])


def test_generated_tokens_check():
    assert harness.generated_tokens_check([1000, 1010], [1020, 990], 0.05) < 0.05
    with pytest.raises(RuntimeError, match="differ by"):
        harness.generated_tokens_check([1000], [1100], 0.05)
    with pytest.raises(RuntimeError, match="missing or zero"):
        harness.generated_tokens_check([1000], [0], 0.05)  # TRL's count logged as 0


def test_posttrain_sampler_reads_the_permuted_file_in_original_order(tmp_path):
    rows = [json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}]}) for i in range(37)]
    data = tmp_path / "rl.jsonl"
    data.write_text("\n".join(rows) + "\n")
    permuted = in_sampler_order(data, seed=0, out_dir=tmp_path / "out")
    lines = permuted.read_text().splitlines()
    assert sorted(lines) == sorted(rows) and lines != rows
    sampler = StepSampler(len(lines), 0)  # what posttrain's GRPO draws from (group_rl.py)
    drawn = [lines[i] for step in range(4) for i in sampler.global_batch(step, 8)]
    assert drawn == rows[:32]  # TRL with shuffle_dataset=False reads rows 0..31 in order


def fake_run(rate_tokens: float, tokens: int, rss: float, positions: dict) -> dict:
    return {"step_times": [1.0, 1.0, 1.0], "step_tokens": [tokens] * 3, "losses": [2.0] * 3,
            "peak_rss_mb": rss, "config": {}, "argv": ["python", "x"], "load": 1.0,
            "wall_s": 5.0, "cpu_s": 8.0, "positions": positions,
            "effective": {"precision": "bf16", "activation_checkpointing": False}}  # fmt: skip


def test_record_schema(tmp_path, tiny_model_dir):
    case = harness.CASES["sft"]
    counted = {"train_positions": 1000, "train_sum_sq": 64000, "nograd_positions": 0,
               "nograd_sum_sq": 0}  # fmt: skip
    runs = {"posttrain": [fake_run(1, 900, 600.0, counted) for _ in range(5)],
            "trl": [fake_run(1, 900, 800.0, counted) for _ in range(5)]}  # fmt: skip
    fx = {"model": tiny_model_dir, "sft_data": tmp_path / "sft.jsonl",
          "lengths": {"sft": {"mean": 30, "mean_sq": 1000}}}  # fmt: skip
    settings = harness.Settings(preset="tiny", pairs=5, warmup=1, steps=2)
    record = harness.summarise(case, settings, fx, {"bf16": 1e12, "fp32": 5e11}, runs, [], 1.0)
    assert list(record)[: len(report.SCHEMA)] == list(report.SCHEMA)
    assert record["case"] == "sft_tiny" and record["pairs"] == 5 and record["ratio"] == 1.0
    assert record["rss_posttrain_mib"] == 600.0 and record["rss_peer_mib"] == 800.0
    assert record["peer_settings"]["effective"]["activation_checkpointing"] is False
    # hw MFU: the counted positions' FLOPs per timed second (3 steps, 1 warm-up) over the peak
    flops = mfu.hw_flops("sft", tiny_model_dir, counted) * 2 / 3 / 2.0
    assert record["hw_mfu_posttrain"] == pytest.approx(flops / 1e12)
    assert "bf16 matmul peak" in record["hw_mfu_basis"]
    line = json.loads(json.dumps(record))  # JSON-serialisable as latest.jsonl stores it
    assert report.with_schema({"case": "rollout_x", "metric": "m", "posttrain": 1, "peer": 1,
                               "ratio": 1})["rss_peer_mib"] is None  # fmt: skip
    assert line["workload"] == "shared-prompt"


def test_position_counter_counts_padding_and_grad(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    counter = PositionCounter(model.config.vocab_size).install()
    try:
        ids = torch.ones(3, 7, dtype=torch.long)  # padding counts: the model computes it
        model(input_ids=ids)
        with torch.no_grad():
            model(input_ids=ids[:, :5])
    finally:
        counter.remove()
    summary = counter.summary()
    assert summary["train_positions"] == 21 and summary["train_sum_sq"] == 3 * 49
    assert summary["nograd_positions"] == 15 and summary["forwards"] == 2


def test_trl_command_flags():
    argv = trl_command("sft", Path("m"), Path("d"), Path("o.json"),
                       {"bf16": True, "padding_free": False, "micro_batch": 4}, batch=16)  # fmt: skip
    assert "--bf16" in argv and "--padding-free" not in argv
    assert argv[argv.index("--micro-batch") + 1] == "4" and argv[argv.index("--batch") + 1] == "16"


def test_every_required_case_exists():
    for name in ("sft_long", "dpo_long", "rm_long", "grpo_long", "sft_bigvocab", "grpo_bigvocab"):
        assert harness.CASES[name].record_name("small") == name
    assert harness.CASES["grpo_long"].new_tokens == 256
    assert {c.workload for c in harness.CASES.values()} == {"shared-prompt", "long", "bigvocab"}
