"""Mixture-of-experts models on every trainer: router losses, metrics, frozen routers and
aux-loss-free balancing (posttrain/models/moe.py), on a tiny Qwen3-MoE made in the test."""

import json
import math

import pytest
import torch
from cli_helpers import REPO, run_cli, sft_overrides
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from posttrain.algorithms import ALGORITHMS
from posttrain.config import MoEConfig, load_recipe
from posttrain.losses.moe import load_balancing_loss
from posttrain.losses.types import LossOutput
from posttrain.models.moe import MoEObjective, find_routers
from posttrain.train.loop import train

MOE_METRICS = (
    "moe/aux_loss",
    "moe/z_loss",
    "moe/load_cv",
    "moe/load_min",
    "moe/load_max",
    "moe/router_entropy",
)


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    from posttrain.models.presets import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny-moe", "tiny", arch="qwen3_moe")


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 10), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def test_sft_cli_adds_router_losses_and_logs_load(moe_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "sft"
    extra = {"train.max_steps": 3, "model.moe.z_loss_coef": 0.001}
    r = run_cli(
        "sft",
        "recipes/sft_tiny_moe.yaml",
        *sft_overrides(moe_model_dir, arithmetic_dir, out, **extra),
    )
    assert r.returncode == 0, r.stderr
    last = records(out)[-1]
    for key in MOE_METRICS:
        assert key in last, key
    assert last["moe/aux_loss"] > 0 and last["moe/z_loss"] > 0
    assert 0 <= last["moe/load_min"] <= 0.25 <= last["moe/load_max"] <= 1  # 4 experts
    assert 0 < last["moe/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-4
    assert not (out / "final" / "moe_selection_bias.json").exists()
    # The model never switched on its own router-logit output: the saved config is unchanged.
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["output_router_logits"] is False


ONLINE = {"grpo.prompts_per_step": 2, "grpo.num_generations": 4, "grpo.max_new_tokens": 4}
PPO = {"ppo.prompts_per_rollout": 4, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 4}
TRAINERS = {
    "rm": ("rm_tiny.yaml", "preference", {}),
    "dpo": ("dpo_tiny.yaml", "preference", {}),
    "grpo": ("grpo_tiny.yaml", "rl", ONLINE),
    "kimi": ("kimi_tiny.yaml", "rl", {k.replace("grpo.", "kimi."): v for k, v in ONLINE.items()}),
    "ppo": ("ppo_tiny.yaml", "rl", {**PPO, "ppo.max_approx_kl": 0.0}),
}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_trainer_trains_a_moe_model(name, moe_model_dir, arithmetic_dir, tmp_path):
    recipe, data, extra = TRAINERS[name]
    values = {
        "model.name_or_path": moe_model_dir,
        "model.moe.aux_loss_coef": 0.01,
        "data.train_path": arithmetic_dir / f"{data}_train.jsonl",
        "data.eval_path": "",
        "train.output_dir": tmp_path / name,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "train.save_every": 0,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    recipe_cls, algorithm_cls = ALGORITHMS[name]
    cfg = load_recipe(
        recipe_cls, REPO / "recipes" / recipe, [f"{k}={v}" for k, v in values.items()]
    )
    result = train(cfg, algorithm_cls(cfg))
    last = records(tmp_path / name)[-1]
    assert result.steps == 2
    for key in MOE_METRICS:
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert torch.isfinite(torch.tensor(last["loss"]))
    # Values, not just presence: 4 experts, top-2. The loads are fractions around 1/4, the
    # router entropy is at most ln 4, and transformers' Switch loss (E·Σ f·P summed over the
    # k choices) is near k = 2 for a near-balanced router and at most E·k = 8.
    assert 0 <= last["moe/load_min"] <= 0.25 <= last["moe/load_max"] <= 1
    assert 0 < last["moe/router_entropy"] <= math.log(4) + 1e-4
    assert 1.0 < last["moe/aux_loss"] < 8.0
    # The routers were trained (the aux loss alone moves them even when every reward is 0).
    init = {k: v for k, v in load_file(moe_model_dir / "model.safetensors").items()}
    final = load_file(tmp_path / name / "final" / "model.safetensors")
    gates = [k for k in final if k.endswith("mlp.gate.weight")]
    assert len(gates) == 4, sorted(final)[:8]
    for key in gates:
        assert not torch.equal(final[key], init[key]), key


def test_aux_loss_equals_reference_values(moe_model_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    ids, mask = batch()
    cfg = MoEConfig(aux_loss_coef=0.1, z_loss_coef=0.01)
    moe = MoEObjective.build([model], cfg)
    with moe.capture():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    forward = moe._forwards[0]
    assert len(forward.logits) == 4 and forward.logits[0].shape == (30, 4)  # (B*T, E) per layer
    reference = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    # "model": transformers' own load_balancing_loss_func, as the model reports it itself.
    torch.testing.assert_close(moe.aux_loss(forward), reference.aux_loss)
    # "posttrain": the per-layer, k-normalised Switch loss of losses/moe.py.
    moe.cfg = MoEConfig(aux_loss_impl="posttrain")
    expected = load_balancing_loss(reference.router_logits, 4, 2, mask.reshape(-1))
    torch.testing.assert_close(moe.aux_loss(forward), expected)
    # The loop's loss: the algorithm's summed loss + (α·aux + β·z)·units of the micro-batch.
    moe.cfg = cfg
    zero = LossOutput(torch.tensor(0.0), torch.tensor(7.0), {})
    out = moe.add_to_loss(zero, 7.0)
    logits = reference.router_logits
    keep = mask.reshape(-1).bool()
    z = torch.stack([(torch.logsumexp(x[keep], -1) ** 2).mean() for x in logits]).mean()
    torch.testing.assert_close(out.total, (0.1 * reference.aux_loss + 0.01 * z) * 7.0)
    torch.testing.assert_close(out.metrics["moe/z_loss"], z)
    out.total.backward()  # differentiable into the routers
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    moe.close()


def test_only_grad_enabled_forwards_in_capture_count(moe_model_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    ids, mask = batch()
    moe = MoEObjective.build([model], MoEConfig())
    model(input_ids=ids, attention_mask=mask)  # outside capture
    with moe.capture():
        with torch.no_grad():  # π_old / reference passes
            model(input_ids=ids, attention_mask=mask)
        with torch.inference_mode():  # generation
            model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert moe._forwards == []
    output = LossOutput(torch.tensor(1.0), torch.tensor(1.0), {"x": torch.tensor(2.0)})
    assert moe.add_to_loss(output, 1.0) is output
    moe.close()


def test_dense_models_get_no_objective(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert MoEObjective.build([model], MoEConfig()) is None


def test_reward_model_and_critic_heads_expose_their_routers(moe_model_dir):
    for cls in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        model = cls.from_pretrained(moe_model_dir, num_labels=1)
        slots, roots = find_routers([model])
        assert len(slots) == 4 and roots == [model]
        moe = MoEObjective.build([model], MoEConfig())
        ids, mask = batch()
        with moe.capture():
            model(input_ids=ids, attention_mask=mask)
        out = moe.add_to_loss(LossOutput(torch.tensor(0.0), torch.tensor(1.0), {}), 1.0)
        assert out.metrics["moe/aux_loss"] > 0
        moe.close()


def test_frozen_router_keeps_router_weights(moe_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "frozen"
    overrides = sft_overrides(
        moe_model_dir,
        arithmetic_dir,
        out,
        **{"train.max_steps": 2, "model.moe.freeze_router": True, "optim.lr": 1e-2},
    )
    recipe_cls, algorithm_cls = ALGORITHMS["sft"]
    cfg = load_recipe(recipe_cls, REPO / "recipes/sft_tiny_moe.yaml", overrides)
    train(cfg, algorithm_cls(cfg))
    before = load_file(moe_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    gates = [k for k in before if k.endswith("mlp.gate.weight")]
    assert len(gates) == 4
    for key in gates:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    experts = [k for k in before if "experts" in k]
    assert experts and all(not torch.equal(after[k], before[k]) for k in experts)


def test_aux_free_bias_moves_load_toward_balance(moe_model_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    with torch.no_grad():  # sharper routers: an imbalanced start (load CV ~0.35)
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10.0)
    moe = MoEObjective.build([model], MoEConfig(aux_free_bias_gamma=0.02))
    ids = torch.randint(3, 100, (8, 32), generator=torch.Generator().manual_seed(1))
    empty = LossOutput(torch.tensor(0.0), torch.tensor(1.0), {})
    cvs = []
    for step in range(20):  # forward, then the bias update after the (here absent) optimizer step
        with moe.capture():
            model(input_ids=ids)
        cvs.append(float(moe.add_to_loss(empty, 1.0).metrics["moe/load_cv"]))
        load = moe._step_counts[0].clone()  # (E,) layer 0's slots this step
        moe.on_step_end(None)
        if step == 0:  # ±γ: the busiest expert is pushed down, the idlest up
            assert moe.bias[0][load.argmax()] == -0.02 and moe.bias[0][load.argmin()] == 0.02
    assert sum(cvs[-10:]) / 10 < 0.7 * cvs[0], cvs
    # The bias only picks experts: the gate weights stay the router's own probabilities.
    gate = model.model.layers[0].mlp.gate
    hidden = torch.randn(5, 128)
    logits, weights, chosen = gate(hidden)
    probs = logits.softmax(-1).gather(-1, chosen)
    assert gate.norm_topk_prob is False  # Qwen3-MoE's default: the raw top-k probabilities
    torch.testing.assert_close(weights, probs)
    assert torch.equal(chosen, (logits.softmax(-1) + moe.bias[0]).topk(2).indices)
    state = moe.state_dict()
    moe.close()
    _, _, plain = gate(hidden)  # hooks removed: plain top-k again
    assert torch.equal(plain, logits.softmax(-1).topk(2).indices)
    assert len(state["bias"]) == 4 and state["bias"][0].shape == (4,)


def test_aux_free_bias_in_training_is_logged_and_saved(moe_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "aux_free"
    extra = {"train.max_steps": 2, "model.moe.aux_free_bias_gamma": 0.01}
    recipe_cls, algorithm_cls = ALGORITHMS["sft"]
    cfg = load_recipe(
        recipe_cls,
        REPO / "recipes/sft_tiny_moe.yaml",
        sft_overrides(moe_model_dir, arithmetic_dir, out, **extra),
    )
    train(cfg, algorithm_cls(cfg))
    assert 0 < records(out)[-1]["moe/bias_spread"] <= 0.04 + 1e-6  # two steps of ±γ
    saved = json.loads((out / "final" / "moe_selection_bias.json").read_text())
    assert sorted(saved["routers"]) == [f"model.layers.{i}.mlp.gate" for i in range(4)]
    assert all(abs(b) <= 0.02 + 1e-6 for row in saved["routers"].values() for b in row)


def test_resume_restores_aux_free_bias(moe_model_dir, arithmetic_dir, tmp_path):
    """A run killed after its step-2 checkpoint and resumed ends with the same weights and the
    same selection bias as an uninterrupted one: the bias is part of the checkpoint."""
    extra = {
        "train.max_steps": 6,
        "train.save_every": 2,
        "model.moe.aux_free_bias_gamma": 0.01,
        "optim.lr": 3e-3,
    }

    def run(out, *flags, env=None):
        args = sft_overrides(moe_model_dir, arithmetic_dir, out, **extra)
        return run_cli("sft", "recipes/sft_tiny_moe.yaml", *args, *flags, env=env)

    assert run(tmp_path / "full").returncode == 0
    stopped = run(tmp_path / "stopped", env={"POSTTRAIN_FAULT_INJECT": "sigkill_after_save:2"})
    assert stopped.returncode == -9
    resumed = run(tmp_path / "stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = [tmp_path / d / "final" for d in ("full", "stopped")]
    bias = [json.loads((f / "moe_selection_bias.json").read_text())["routers"] for f in final]
    assert bias[0] == bias[1] and any(b for row in bias[0].values() for b in row)
    weights = [load_file(f / "model.safetensors") for f in final]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=0, msg=key)
