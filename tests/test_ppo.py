"""PPO actor-critic RLHF on the shared loop, rollout engine and scorer (issue 5)."""

import json

import pytest
import torch
from accelerate import Accelerator
from cli_helpers import REPO, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from posttrain.algorithms.ppo import PPO, PPORecipe
from posttrain.algorithms.ppo_rollout import RunningMoments, whiten
from posttrain.config import ConfigError, load_recipe
from posttrain.losses.common import masked_whiten
from posttrain.models.value_head import critic_values
from posttrain.train.loop import train

PPO_METRICS = (
    "score",
    "non_score_reward",
    "kl",
    "kl_coef",
    "approx_kl",
    "clip_fraction",
    "value_clip_fraction",
    "explained_variance",
    "entropy",
    "returns_mean",
    "returns_std",
    "advantages_mean",
    "advantages_std",
    "completion_length",
    "policy_loss",
    "value_loss",
    "critic_grad_norm",
    "rewards/mean",
)


def ppo_overrides(model_dir, data_dir, out, **extra):
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "rl_train.jsonl",
        "data.eval_path": "",
        "train.output_dir": out,
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "ppo.prompts_per_rollout": 8,
        "ppo.ppo_epochs": 2,
        "ppo.max_new_tokens": 6,
        "ppo.max_approx_kl": 0.0,
        "logging.log_every": 1,
        "logging.progress": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def build(model_dir, data_dir, out, recipe="ppo_tiny.yaml", **extra):
    overrides = ppo_overrides(model_dir, data_dir, out, **extra)
    cfg = load_recipe(PPORecipe, REPO / "recipes" / recipe, overrides)
    algo = PPO(cfg)
    accelerator = Accelerator(cpu=True)
    model = algo.setup(accelerator)
    return algo, accelerator, model


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, arithmetic_dir, tmp_path_factory):
    """A reward model made by `posttrain rm` (2 steps: only its format matters here)."""
    out = tmp_path_factory.mktemp("rm")
    r = run_cli(
        "rm",
        "recipes/rm_tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={arithmetic_dir / 'preference_train.jsonl'}",
        "data.eval_path=",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=4",
        "logging.progress=false",
    )
    assert r.returncode == 0, r.stderr
    return out / "final"


def test_ppo_cli_logs_every_metric(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "ppo"
    r = run_cli(
        "ppo",
        "recipes/ppo_tiny.yaml",
        *ppo_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{
                "data.eval_path": arithmetic_dir / "rl_test.jsonl",
                "data.max_eval_examples": 8,
                "ppo.kl_control": "adaptive",
            },
        ),
    )
    assert r.returncode == 0, r.stderr
    logged = records(out)
    assert [x["step"] for x in logged] == [1, 2, 3]
    for key in (*PPO_METRICS, "rewards/accuracy/mean", "accuracy"):
        assert key in logged[-1], key
    assert "eval/accuracy" in logged[-1]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "critic" / "model.safetensors").is_file()


def test_ppo_cli_with_reward_model_score_and_critic(
    tiny_model_dir, arithmetic_dir, tmp_path, reward_model_dir
):
    out = tmp_path / "ppo-rm"
    r = run_cli(
        "ppo",
        "recipes/ppo_tiny_rm.yaml",
        *ppo_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{
                "train.max_steps": 2,
                "ppo.rewards": f"[{{name: reward_model, params: {{path: {reward_model_dir}}}}}]",
                "ppo.critic_init": "reward",
            },
        ),
    )
    assert r.returncode == 0, r.stderr
    last = records(out)[-1]
    assert "rewards/reward_model/mean" in last and "rewards/accuracy/mean" not in last
    for key in PPO_METRICS:
        assert key in last, key


def test_critic_from_reward_model_predicts_its_score(
    tiny_model_dir, arithmetic_dir, tmp_path, reward_model_dir
):
    algo, acc, _ = build(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path,
        **{
            "ppo.rewards": f"[{{name: reward_model, params: {{path: {reward_model_dir}}}}}]",
            "ppo.critic_init": "reward",
        },
    )
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    critic = acc.unwrap_model(algo.critic)
    torch.testing.assert_close(critic.score.weight, rm.score.weight)
    assert critic.score.bias is None
    # V of the state after the whole text (read when a next token is scored) is the RM's score.
    text = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        score = rm(input_ids=text).logits[0, 0]
        value = critic_values(critic, text, torch.ones(1, 5), torch.tensor([[3]]), torch.ones(1, 1))
    torch.testing.assert_close(value[0, 0], score, rtol=1e-4, atol=1e-5)


def test_critic_values_ignore_left_padding(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, _ = build(tiny_model_dir, arithmetic_dir, tmp_path)
    critic = acc.unwrap_model(algo.critic)
    prompt, completion = torch.tensor([[0, 0, 11, 12]]), torch.tensor([[13, 14, 15]])
    prompt_mask = torch.tensor([[0, 0, 1, 1]])
    with torch.no_grad():
        padded = critic_values(critic, prompt, prompt_mask, completion, torch.tensor([[1, 1, 0]]))
        plain = critic(input_ids=torch.tensor([[11, 12, 13, 14, 15]])).logits[0, :, 0]
    # V(s_t) is read where token t is predicted: positions 1, 2 of the unpadded text
    torch.testing.assert_close(padded[0], torch.stack([plain[1], plain[2], torch.tensor(0.0)]))


def test_rollout_serves_epochs_times_minibatches_steps(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path)  # 8 rows, minibatch 4
    seen = []
    for step in range(4):  # 2 epochs × 2 minibatches
        micro = algo.micro_batches(step, acc, model)
        assert len(micro) == 1 and len(micro[0]) == 4
        seen.append(micro[0].completion_ids)
        assert algo.rollouts_done == 1
    for epoch in (seen[:2], seen[2:]):  # every row once per epoch
        rows = sorted(map(tuple, torch.cat(epoch).tolist()))
        assert rows == sorted(map(tuple, algo.rollout.completion_ids.tolist()))
    algo.micro_batches(4, acc, model)
    assert algo.rollouts_done == 2
    batch = algo.rollout
    assert batch.advantages.shape == batch.completion_ids.shape == batch.returns.shape
    mask = batch.completion_mask.bool()
    assert abs(float(batch.advantages[mask].mean())) < 1e-5  # whitened over the rollout
    torch.testing.assert_close(batch.old_logprobs, batch.old_logprobs.masked_fill(~mask, 0.0))


def test_grad_accum_splits_a_minibatch_into_micro_batches(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(
        tiny_model_dir, arithmetic_dir, tmp_path, **{"train.batch_size": 2, "train.grad_accum": 2}
    )
    micro = algo.micro_batches(0, acc, model)
    assert [len(m) for m in micro] == [2, 2] and len(algo.plan) == 4
    total = sum(algo.compute_loss(model, m).total for m in micro)
    total.backward()
    assert all(p.grad is not None for p in acc.unwrap_model(algo.critic).score.parameters())
    # the loop, not PPO, owns the critic's optimizer: PPO registers it as an extra trainable
    assert [t.name for t in algo.extra_trainables()] == ["critic"]
    assert algo.extra_trainables()[0].module is algo.critic


def test_approx_kl_bound_skips_the_rest_of_the_rollout(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(
        tiny_model_dir, arithmetic_dir, tmp_path, **{"ppo.max_approx_kl": 1e-6}
    )

    def step(index):
        micro = algo.micro_batches(index, acc, model)
        sum(algo.compute_loss(model, m).total for m in micro).backward()
        return algo.on_step_end(model, index + 1, acc)

    assert step(0)["early_stops"] == 0  # π_θ = π_old: approx KL 0
    with torch.no_grad():  # move the policy away from the one that sampled the rollout
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    assert step(1)["early_stops"] == 1 and algo.rollouts_done == 1
    step(2)  # the 2 minibatches left of this rollout are skipped: a new rollout
    assert algo.rollouts_done == 2


def test_state_dict_mid_rollout_restores_the_same_minibatches(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    extra = {"ppo.kl_control": "adaptive", "ppo.normalize_scores": True}
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path / "a", **extra)
    algo.micro_batches(0, acc, model)
    state = algo.state_dict()
    assert state["kl_ctl"]["value"] != 0.05 and state["moments"]["count"] == 8
    expected = algo.micro_batches(1, acc, model)[0]
    other, acc_b, model_b = build(tiny_model_dir, arithmetic_dir, tmp_path / "b", **extra)
    other.load_state_dict(state)
    got = other.micro_batches(1, acc_b, model_b)[0]
    assert other.rollouts_done == 1 and other.kl_ctl.value == algo.kl_ctl.value
    for name, tensor in expected.tensors().items():
        torch.testing.assert_close(getattr(got, name), tensor, msg=name)


def test_lora_recipe_trains_policy_adapter_and_critic(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, "ppo_tiny_lora.yaml")
    assert algo.reference is None  # the reference is the policy with its adapter disabled
    micro = algo.micro_batches(0, acc, model)
    out = algo.compute_loss(model, micro[0])
    out.total.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    critic = acc.unwrap_model(algo.critic)
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)


def test_config_errors(tiny_model_dir, arithmetic_dir, tmp_path):
    with pytest.raises(ConfigError, match="must be a multiple of the minibatch"):
        build(tiny_model_dir, arithmetic_dir, tmp_path, **{"train.batch_size": 3})
    with pytest.raises(ConfigError, match="critic_init=reward needs a reward_model"):
        build(tiny_model_dir, arithmetic_dir, tmp_path, **{"ppo.critic_init": "reward"})
    with pytest.raises(ConfigError, match="fp16"):
        build(tiny_model_dir, arithmetic_dir, tmp_path, **{"train.mixed_precision": "fp16"})


def test_whiten_and_running_moments():
    x, mask = torch.randn(3, 5), torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [0] * 5])
    torch.testing.assert_close(whiten(x, mask, Accelerator(cpu=True)), masked_whiten(x, mask))
    # float64 batches: the check is the merge formula, not float32 rounding of Σx²
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(4, generator=g).double() * 3 + 1,
        torch.randn(7, generator=g).double() - 2,
    ]
    moments = RunningMoments()
    for b in batches:
        moments.update(float(b.sum()), float((b**2).sum()), b.numel())
    everything = torch.cat(batches).double()
    assert moments.count == 11
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.std == pytest.approx(float(everything.std(correction=0)))


def resume_overrides(model_dir, data_dir, out, **extra):
    return ppo_overrides(
        model_dir,
        data_dir,
        out,
        **{
            "train.max_steps": 6,  # rollouts of 4 steps: stopped mid-rollout at step 2
            "train.save_every": 2,
            "train.keep_checkpoints": 3,
            "optim.lr": 1e-3,
            "ppo.critic_lr": 1e-3,
            "ppo.kl_control": "adaptive",
            "ppo.kl_horizon": 100,
            "ppo.rewards": "[{name: accuracy}, {name: digit_overlap, weight: 0.5}]",
            **extra,
        },
    )


def assert_resumed_run_matches(full, resumed):
    want = {r["step"]: r for r in records(full)}
    got = {r["step"]: r for r in records(resumed)}  # steps 1-2, then 3-6 after the resume
    assert want[5]["kl_coef"] != want[1]["kl_coef"]  # the adaptive controller moved β
    for step in range(3, 7):
        for key in ("kl_coef", "kl", "score", "loss", "value_loss", "critic_lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)
    for part in ("final", "critic"):
        a = load_file(full / part / "model.safetensors")
        b = load_file(resumed / part / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{part}: {k}")


def test_resume_mid_rollout_in_process(tiny_model_dir, arithmetic_dir, tmp_path):
    """Checkpoint at step 2 (mid-rollout), then a new run resumes from it: the loop's
    save_state/load_state must carry the critic, both optimisers and the algorithm state."""
    runs = {
        "full": [],
        "stopped": ["train.max_steps=2"],  # constant schedule: the first 2 steps are the same
        "resumed": ["train.resume=true"],
    }
    for name, extra in runs.items():
        out = tmp_path / ("full" if name == "full" else "stopped")
        overrides = resume_overrides(tiny_model_dir, arithmetic_dir, out) + extra
        cfg = load_recipe(PPORecipe, REPO / "recipes/ppo_tiny.yaml", overrides)
        train(cfg, PPO(cfg))
    checkpoint = sorted((tmp_path / "stopped" / "checkpoints").iterdir())[0]
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"} <= {
        p.name for p in checkpoint.iterdir()
    }  # the critic (0) and the policy (1), each with its optimizer
    assert_resumed_run_matches(tmp_path / "full", tmp_path / "stopped")


@pytest.mark.slow
def test_resume_after_sigkill_restores_kl_controller_policy_critic_and_optimisers(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    def run(out, *extra, env=None):
        overrides = resume_overrides(tiny_model_dir, arithmetic_dir, out)
        return run_cli("ppo", "recipes/ppo_tiny.yaml", *overrides, *extra, env=env)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    stopped = run(tmp_path / "stopped", env={"POSTTRAIN_FAULT_INJECT": "sigkill_after_save:2"})
    assert stopped.returncode == -9
    assert not (tmp_path / "stopped" / "final").exists()
    resumed = run(tmp_path / "stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_resumed_run_matches(tmp_path / "full", tmp_path / "stopped")
