"""Reward modelling and the DPO family on the shared loop (issue: preference training)."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from cli_helpers import REPO, run_cli
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.algorithms.dpo import DPO, DPORecipe
from posttrain.config import load_recipe
from posttrain.data.loading import DataError
from posttrain.data.preference import encode_preference_file
from posttrain.models.loading import load_tokenizer


def pref_overrides(model_dir, data_dir, out, **extra):
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "preference_train.jsonl",
        "data.eval_path": data_dir / "preference_test.jsonl",
        "data.max_eval_examples": 32,
        "train.output_dir": out,
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def test_bad_pairs_are_counted_skips(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "chosen": "3", "rejected": "3"},  # identical
        {"prompt": "1+3=", "chosen": "", "rejected": "5"},  # empty
        {"prompt": "2+2=", "chosen": "4", "rejected": "4 "},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = encode_preference_file(tok, str(path), max_length=64)
    assert len(data.examples) == 2
    assert data.skipped == {"identical": 1, "empty": 1, "truncated_away": 0}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps(rows[0])
        + "\n"
        + json.dumps(
            {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
        )
    )
    with pytest.raises(DataError, match="mixed.jsonl: rows do not share one schema"):
        encode_preference_file(tok, str(mixed), max_length=64)
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"prompt": "a", "chosen": "b"}))
    with pytest.raises(DataError, match="missing column 'rejected'"):
        encode_preference_file(tok, str(missing), max_length=64)


def test_rm_cli_trains_and_output_scores_with_plain_transformers(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    out = tmp_path / "rm"
    r = run_cli(
        "rm",
        "recipes/rm_tiny.yaml",
        *pref_overrides(tiny_model_dir, arithmetic_dir, out, **{"train.max_steps": 6}),
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "reward_chosen", "reward_rejected", "reward_margin"} <= records[0].keys()
    assert "eval/accuracy" in records[-1]
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    enc = tok(["What is 1 + 1? 2", "What is 1 + 1? 3"], return_tensors="pt", padding=True)
    scores = model(**enc).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def build_dpo(model_dir, data_dir, out, **extra):
    cfg = load_recipe(
        DPORecipe, REPO / "recipes/dpo_tiny.yaml", pref_overrides(model_dir, data_dir, out, **extra)
    )
    algo = DPO(cfg)
    accelerator = Accelerator(cpu=True)
    model = algo.setup(accelerator)
    return algo, accelerator, model


def sgd_step(algo, model, batch, lr=0.5):
    """One plain gradient step on the algorithm's own loss (same update for identical inputs)."""
    model.zero_grad(set_to_none=True)
    out = algo.compute_loss(model, batch)
    (out.total / out.units).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def test_precomputed_reference_equals_live_reference(tiny_model_dir, arithmetic_dir, tmp_path):
    """After an optimizer step (policy != reference) the cached reference log-probs give the
    live frozen reference's loss, and that loss is no longer ln 2: a reference that followed
    the policy (or a cache filled from the moving policy) would give ln 2 again."""
    live, acc, live_model = build_dpo(tiny_model_dir, arithmetic_dir, tmp_path / "a")
    cached, acc2, cached_model = build_dpo(
        tiny_model_dir, arithmetic_dir, tmp_path / "b", **{"dpo.precompute_ref_logps": True}
    )
    assert cached.reference is None and live.reference is not None
    assert cached.precompute_passes > 0
    batch_live = live.micro_batches(0, acc, live_model)[0]
    batch_cached = cached.micro_batches(0, acc2, cached_model)[0]
    assert batch_cached.ref_logps is not None and batch_live.ref_logps is None
    sgd_step(live, live_model, batch_live)
    sgd_step(cached, cached_model, batch_cached)
    batch_live = live.micro_batches(1, acc, live_model)[0]
    batch_cached = cached.micro_batches(1, acc2, cached_model)[0]
    with torch.no_grad():
        loss_live = live.compute_loss(live_model, batch_live)
        loss_cached = cached.compute_loss(cached_model, batch_cached)
    mean_live = float(loss_live.total / loss_live.units)
    mean_cached = float(loss_cached.total / loss_cached.units)
    assert abs(mean_live - math.log(2)) > 1e-3, mean_live  # the policy really moved
    assert abs(mean_live - mean_cached) < 1e-5
    assert live.ref_forward_passes == 2 and cached.ref_forward_passes == 0


def test_dpo_cli_with_precompute_makes_no_reference_passes(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    out = tmp_path / "dpo"
    r = run_cli(
        "dpo",
        "recipes/dpo_tiny.yaml",
        *pref_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{"dpo.precompute_ref_logps": True, "optim.lr": 1e-3},
        ),
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(rec["ref_forward_passes"] == 0 for rec in records)
    for key in (
        "rewards_chosen",
        "rewards_rejected",
        "rewards_margin",
        "rewards_accuracy",
        "logps_chosen",
    ):
        assert key in records[0]
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


def hand_logps(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Σ log π(token) over the completion tokens of one unpadded sequence, and their count."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = logits.log_softmax(-1)
    picked = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]
    return sum(picked), len(picked)


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo"])
def test_every_dpo_variant_matches_the_formula(tiny_model_dir, arithmetic_dir, tmp_path, loss_type):
    """Each loss on a policy moved away from its reference equals the paper's formula computed
    here by hand from one unpadded forward per sequence (packing, batching and the reference
    plumbing all have to be right for the numbers to agree)."""
    beta, eps, gamma = 0.1, 0.1, 0.5
    algo, acc, model = build_dpo(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path,
        **{"dpo.loss_type": loss_type, "dpo.label_smoothing": eps, "dpo.beta": beta},
    )
    if loss_type == "simpo":
        assert algo.reference is None  # reference-free
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = algo.micro_batches(0, acc, model)[0]
    with torch.no_grad():
        out = algo.compute_loss(model, batch)
    indices = algo.sampler.global_batch(0, algo.global_batch)[: algo.cfg.train.batch_size]
    expected = []
    for example in (algo.train_examples[i] for i in indices):
        pc, nc = hand_logps(model, example.chosen_ids, example.chosen_mask)
        pr, nr = hand_logps(model, example.rejected_ids, example.rejected_mask)
        rc, _ = hand_logps(reference, example.chosen_ids, example.chosen_mask)
        rr, _ = hand_logps(reference, example.rejected_ids, example.rejected_mask)
        h = (pc - rc) - (pr - rr)
        sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
        if loss_type == "sigmoid":
            expected.append(-math.log(sig(beta * h)))
        elif loss_type == "cdpo":
            expected.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
        elif loss_type == "robust":  # Chowdhury et al.'s unbiased loss
            expected.append(
                (-(1 - eps) * math.log(sig(beta * h)) + eps * math.log(sig(-beta * h)))
                / (1 - 2 * eps)
            )
        elif loss_type == "hinge":
            expected.append(max(0.0, 1.0 - beta * h))
        elif loss_type == "ipo":
            h_avg = (pc - rc) / nc - (pr - rr) / nr
            expected.append((h_avg - 1.0 / (2.0 * beta)) ** 2)
        else:
            expected.append(-math.log(sig(beta * pc / nc - beta * pr / nr - gamma)))
    assert int(out.units) == len(expected)
    got = float(out.total / out.units)
    want = sum(expected) / len(expected)
    assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)


def test_lora_dpo_uses_disabled_adapter_and_merges(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "lora"
    r = run_cli(
        "dpo", "recipes/dpo_tiny_lora.yaml", *pref_overrides(tiny_model_dir, arithmetic_dir, out)
    )
    assert r.returncode == 0, r.stderr
    final = out / "final"
    assert (final / "adapter_config.json").is_file()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(PeftModel.from_pretrained(base, final), PeftModel)
    merged = tmp_path / "merged"
    r = run_cli("merge", str(final), str(merged))
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_lora_reference_is_the_base_model(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build_dpo(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path,
        **{"model.lora.r": 4, "dpo.precompute_ref_logps": False},
    )
    assert algo.reference is None  # no second copy of the weights
    batch = algo.micro_batches(0, acc, model)[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from posttrain.algorithms.dpo import completion_logps

    with torch.no_grad():
        expected = completion_logps(base, batch)[0]
        got = algo.reference_logps(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
