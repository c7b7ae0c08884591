"""The benchmark harness's own logic (bench/): ABBA order, the median pair ratio, the record
schema, the GRPO generated-token check, identical GRPO prompts on both sides, the position
counter behind the hardware MFU, the gate that pauses a side between pairs, and the TRL command
line. No timing is asserted."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench import harness, mfu, report
from bench.gate import GatedProcess, subtract_waits
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


def fake_run(tokens: int, rss: float, positions: dict, steps: int = 11) -> dict:
    return {"step_times": [1.0] * steps, "step_tokens": [tokens] * steps,
            "losses": [2.0] * steps, "peak_rss_mb": rss, "config": {}, "argv": ["python", "x"],
            "load": 1.0, "wall_s": 5.0, "cpu_s": 8.0, "positions": positions,
            "effective": {"precision": "bf16", "activation_checkpointing": False}}  # fmt: skip


def test_pair_segments_cut_one_run_into_its_pairs():
    run = fake_run(100, 1.0, {})
    run["step_times"] = [9.0] + [float(i) for i in range(1, 11)]  # the warm-up step first
    segments = harness.pair_segments(run, warmup=1, steps=2)
    assert [s["step_times"] for s in segments] == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert all(s["run_steps"] == 11 and s["step_tokens"] == [100, 100] for s in segments)
    with pytest.raises(RuntimeError, match="do not split"):
        harness.pair_segments(run, warmup=0, steps=2)


CHILD = textwrap.dedent("""
    import sys, time
    from bench.gate import Gate
    gate = Gate.from_env()
    for step in range(1, 6):
        time.sleep(0.01)
        print("step", step, "waited", round(gate.after_step(step) > 0), flush=True)
    sys.exit(int(sys.argv[1]))
""")


def test_gate_stops_a_child_after_each_listed_step_and_subtracts_the_wait(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    waits = tmp_path / "waits.json"
    env = {"PYTHONPATH": str(repo), "BENCH_GATE_WAITS": str(waits)}
    child = GatedProcess([sys.executable, "-c", CHILD, "0"], tmp_path / "child.log", env,
                         repo, stops=[2, 4])  # fmt: skip
    assert child.wait_stop() == 2
    assert "step 3" not in (tmp_path / "child.log").read_text()  # it waits at the gate
    child.release()
    assert child.wait_stop() == 4
    child.release()
    usage = child.finish()
    assert usage.ru_maxrss > 0
    log = (tmp_path / "child.log").read_text().splitlines()
    assert log == [f"step {s} waited {int(s in (2, 4))}" for s in range(1, 6)]
    waited = json.loads(waits.read_text())
    assert set(waited) == {"2", "4"}
    times = [1.0 + (waited[str(s)] if str(s) in waited else 0.0) for s in range(1, 6)]
    assert subtract_waits(times, waits) == pytest.approx([1.0] * 5)


def test_gated_child_that_fails_is_reported_with_its_log(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    child = GatedProcess([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                         tmp_path / "child.log", {"PYTHONPATH": str(repo)}, repo, stops=[2])  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        child.wait_stop()


def test_record_schema(tmp_path, tiny_model_dir):
    case = harness.CASES["sft"]
    counted = {"train_positions": 1000, "train_sum_sq": 64000, "nograd_positions": 0,
               "nograd_sum_sq": 0}  # fmt: skip
    runs = {"posttrain": harness.pair_segments(fake_run(900, 600.0, counted), 1, 2),
            "trl": harness.pair_segments(fake_run(900, 800.0, counted), 1, 2)}  # fmt: skip
    fx = {"model": tiny_model_dir, "sft_data": tmp_path / "sft.jsonl",
          "lengths": {"sft": {"mean": 30, "mean_sq": 1000}}}  # fmt: skip
    settings = harness.Settings(preset="tiny", pairs=5, warmup=1, steps=2)
    record = harness.summarise(case, settings, fx, {"bf16": 1e12, "fp32": 5e11}, runs, [], 1.0)
    assert list(record)[: len(report.SCHEMA)] == list(report.SCHEMA)
    assert record["case"] == "sft_tiny" and record["pairs"] == 5 and record["ratio"] == 1.0
    assert record["rss_posttrain_mib"] == 600.0 and record["rss_peer_mib"] == 800.0
    assert record["peer_settings"]["effective"]["activation_checkpointing"] is False
    # hw MFU: the counted positions' FLOPs (over the run's 11 steps) per timed second over the
    # peak; a segment is 2 of them, timed 2 s
    flops = mfu.hw_flops("sft", tiny_model_dir, counted) * 2 / 11 / 2.0
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
