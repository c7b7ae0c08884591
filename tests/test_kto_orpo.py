"""KTO as its own algorithm, ORPO / cDPO / robust through the DPO trainer (spec §14)."""

import json

import pytest
import torch
from accelerate import Accelerator
from cli_helpers import REPO, run_cli
from test_preference import pref_overrides

from posttrain.algorithms import ALGORITHMS
from posttrain.algorithms.dpo import DPO, DPORecipe
from posttrain.algorithms.kto import KTO, KTORecipe
from posttrain.config import ConfigError, load_recipe
from posttrain.data.kto import encode_kto_file, kto_collate
from posttrain.data.loading import DataError
from posttrain.models.loading import load_tokenizer


def kto_overrides(model_dir, data_dir, out, **extra):
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "kto_train.jsonl",
        "data.eval_path": data_dir / "kto_test.jsonl",
        "data.max_eval_examples": 16,
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.eval_every": 2,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def test_kto_data_mismatched_rows_and_errors(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "k.jsonl"
    rows = [
        {"prompt": "1+1=", "completion": "2", "label": True},
        {"prompt": "1+2=", "completion": "", "label": True},  # empty: skipped
        {"prompt": "2+2=", "completion": "5", "label": False},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = encode_kto_file(tok, str(path), max_length=64)
    assert len(data.examples) == 2 and data.skipped["empty"] == 1
    a, b = data.examples
    batch = kto_collate(data.examples, tok.pad_token_id)
    assert batch.desirable.tolist() == [True, False]
    # row 2 (first mismatched) is a's prompt followed by b's completion, and vice versa
    assert batch.input_ids[2, : len(a.prompt_ids) + len(b.completion_ids)].tolist() == (
        a.prompt_ids + b.completion_ids
    )
    assert int((batch.labels[2] != -100).sum()) == sum(b.completion_mask)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b", "label": "yes"}))
    with pytest.raises(DataError, match="bad.jsonl: row 1: label must be true or false"):
        encode_kto_file(tok, str(bad), max_length=64)
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"prompt": "a", "completion": "b"}))
    with pytest.raises(DataError, match="missing column 'label'"):
        encode_kto_file(tok, str(missing), max_length=64)


def test_kto_end_to_end_cli(tiny_model_dir, arithmetic_dir, tmp_path):
    assert ALGORITHMS["kto"] == (KTORecipe, KTO)
    out = tmp_path / "kto"
    r = run_cli("kto", "recipes/kto_tiny.yaml", *kto_overrides(tiny_model_dir, arithmetic_dir, out))
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(k in records[0] for k in ("loss", "kl", "rewards_chosen", "rewards_rejected"))
    assert any("eval/loss" in rec for rec in records)
    assert (out / "final" / "model.safetensors").is_file()


def test_kto_step_moves_rewards_apart(tiny_model_dir, arithmetic_dir, tmp_path):
    cfg = load_recipe(
        KTORecipe,
        REPO / "recipes" / "kto_tiny.yaml",
        kto_overrides(tiny_model_dir, arithmetic_dir, tmp_path, **{"train.batch_size": 8}),
    )
    algo, acc = KTO(cfg), Accelerator(cpu=True)
    model = algo.setup(acc)
    batch = algo.micro_batches(0, acc, model)[0]
    first = algo.compute_loss(model, batch)
    # at the start the policy is its reference: h = 0, z_ref = 0, every row's loss is 1 - σ(0)
    torch.testing.assert_close(first.total, torch.tensor(0.5 * batch.num_rows))
    torch.testing.assert_close(first.metrics["kl"], torch.tensor(0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        out = algo.compute_loss(model, batch)
        (out.total / out.units).backward()
        optimizer.step()
    out = algo.compute_loss(model, batch)
    assert out.total < first.total
    assert out.metrics["rewards_chosen"] > out.metrics["rewards_rejected"]


def test_kto_needs_two_rows_per_micro_batch(tiny_model_dir, arithmetic_dir, tmp_path):
    cfg = load_recipe(
        KTORecipe,
        REPO / "recipes" / "kto_tiny.yaml",
        kto_overrides(tiny_model_dir, arithmetic_dir, tmp_path, **{"train.batch_size": 1}),
    )
    with pytest.raises(ConfigError, match="train.batch_size >= 2"):
        KTO(cfg).setup(Accelerator(cpu=True))
    cfg = load_recipe(
        KTORecipe,
        REPO / "recipes" / "kto_tiny.yaml",
        kto_overrides(tiny_model_dir, arithmetic_dir, tmp_path, **{"data.packing": True}),
    )
    with pytest.raises(ConfigError, match="data.packing"):
        KTO(cfg).setup(Accelerator(cpu=True))


def test_kto_eval_batches_count_full_batches_only(tiny_model_dir, arithmetic_dir, tmp_path):
    # 5 held-out rows in micro-batches of 4: the lone fifth row has no mismatched partner, so it
    # runs (every process runs every forward) with weight 0 and the loss is the first batch's.
    cfg = load_recipe(
        KTORecipe,
        REPO / "recipes" / "kto_tiny.yaml",
        kto_overrides(tiny_model_dir, arithmetic_dir, tmp_path, **{"data.max_eval_examples": 5}),
    )
    algo, acc = KTO(cfg), Accelerator(cpu=True)
    model = algo.setup(acc)
    assert len(algo.eval_examples) == 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # move the policy off its reference so rows' losses differ
        optimizer.zero_grad()
        out = algo.compute_loss(model, algo.micro_batches(0, acc, model)[0])
        (out.total / out.units).backward()
        optimizer.step()
    metrics = algo.evaluate(model, acc)
    with torch.no_grad():
        first = algo.compute_loss(model, algo.collate(algo.eval_examples[:4]))
    assert metrics["loss"] == pytest.approx(float(first.total / first.units), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["orpo", "cdpo", "robust"])
def test_dpo_trainer_runs_orpo_cdpo_robust(tiny_model_dir, arithmetic_dir, tmp_path, loss_type):
    overrides = pref_overrides(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path,
        **{"dpo.loss_type": loss_type, "dpo.label_smoothing": 0.1},
    )
    cfg = load_recipe(DPORecipe, REPO / "recipes" / "dpo_tiny.yaml", overrides)
    algo, acc = DPO(cfg), Accelerator(cpu=True)
    model = algo.setup(acc)
    assert (algo.reference is None) == (loss_type == "orpo")  # ORPO loads no reference
    out = algo.compute_loss(model, algo.micro_batches(0, acc, model)[0])
    assert torch.isfinite(out.total)
    out.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if loss_type == "orpo":
        assert "nll" in out.metrics and algo.ref_forward_passes == 0


@pytest.mark.slow
def test_kto_runs_on_two_processes(tiny_model_dir, arithmetic_dir, tmp_path):
    """The reference-KL estimate is all-reduced over processes (a collective every step)."""
    from cli_helpers import run_torchrun

    out = tmp_path / "two"
    r = run_torchrun(
        "kto",
        "recipes/kto_tiny.yaml",
        *kto_overrides(tiny_model_dir, arithmetic_dir, out, **{"train.batch_size": 2}),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kl"] >= 0 and "eval/loss" in last
