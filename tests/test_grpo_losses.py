"""GRPO with the spec §13 losses, advantage estimators and rollout corrections: each trains
(non-zero rewards, non-zero gradient, parameters move), and the correction
acts on the loss exactly as defined."""

import dataclasses
import json
import math

import pytest
import torch
from cli_helpers import run_cli
from test_grpo import build, rl_overrides

from posttrain.config import ConfigError

# The random tiny model is never right and rarely overlaps the answer, so reward the length of
# its completion: it varies within every group, so advantages are non-zero and something trains.
PARTIAL_CREDIT = "[{name: 'l16_length_reward:length'}]"


@pytest.fixture(autouse=True)
def length_reward(tmp_path, monkeypatch):
    (tmp_path / "l16_length_reward.py").write_text(
        "def length(prompts, completions, **kwargs):\n"
        "    return [len(c) / 10 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def train_one_step(algo, acc, model):
    batches = algo.micro_batches(0, acc, model)
    assert float(torch.cat([b.rewards for b in batches]).abs().sum()) > 0
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    units = sum(algo.num_units(b) for b in batches)
    for batch in batches:
        out = algo.compute_loss(model, batch)
        assert torch.isfinite(out.total)
        (out.total / units).backward()
    optimizer.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return batches, out, moved


@pytest.mark.parametrize(
    "extra",
    [
        {"grpo.loss_type": "gspo"},
        {"grpo.loss_type": "gspo_token", "grpo.advantage": "reinforce_pp", "grpo.beta": 0.05},
        {"grpo.loss_type": "cispo", "grpo.rollout_correction": "tis"},
        {"grpo.loss_type": "grpo", "grpo.advantage": "rloo", "grpo.rollout_correction": "mis"},
    ],
    ids=["gspo", "gspo_token+reinforce_pp", "cispo+tis", "rloo+mis"],
)
def test_new_objectives_train(tiny_model_dir, arithmetic_dir, tmp_path, extra):
    algo, acc, model = build(
        tiny_model_dir, arithmetic_dir, tmp_path, **{"grpo.rewards": PARTIAL_CREDIT, **extra}
    )
    batches, out, moved = train_one_step(algo, acc, model)
    assert moved > 0
    if extra.get("grpo.advantage") == "reinforce_pp":
        adv = batches[0].advantages
        assert adv.shape == batches[0].completion_ids.shape  # per token
        assert adv[~batches[0].completion_mask.bool()].abs().sum() == 0
        assert "kl" in out.metrics
    if "grpo.rollout_correction" in extra:
        # engine log-probs equal the fp32 training forward: the mismatch is ~0, nothing corrected
        assert out.metrics["rollout_logp_abs_diff"] < 1e-3
        assert out.metrics["rollout_corrected_fraction"] == 0


def test_gspo_uses_paper_clip_defaults_and_explicit_values_win(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    from posttrain.algorithms.policy_objective import clip_range

    algo, _, _ = build(tiny_model_dir, arithmetic_dir, tmp_path, **{"grpo.loss_type": "gspo"})
    assert clip_range(algo.cfg.grpo) == (3e-4, 4e-4)
    g = dataclasses.replace(algo.cfg.grpo, epsilon_high=0.01)
    assert clip_range(g) == (3e-4, 0.01)
    assert clip_range(dataclasses.replace(g, loss_type="cispo", epsilon_high=None)) == (1.0, 4.0)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "gspo_token"])
def test_rollout_correction_weights_and_masks_the_loss(
    tiny_model_dir, arithmetic_dir, tmp_path, loss_type
):
    extra = {"grpo.rewards": PARTIAL_CREDIT, "grpo.loss_type": loss_type}
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, **extra)
    batch = algo.micro_batches(0, acc, model)[0]
    # all-positive advantages: real advantages sum to ~0 and the loss would be all cancellation
    batch = dataclasses.replace(batch, advantages=torch.ones_like(batch.advantages))
    g = algo.cfg.grpo
    base = algo.compute_loss(model, batch).total.detach()
    assert base.abs() > 0
    # μ = π_old / 1.5: every token's TIS weight is 1.5 (< cap 2), so the loss scales by 1.5
    shifted = dataclasses.replace(batch, rollout_logprobs=batch.rollout_logprobs - math.log(1.5))
    algo.cfg.grpo = dataclasses.replace(g, rollout_correction="tis")
    tis = algo.compute_loss(model, shifted)
    torch.testing.assert_close(tis.total.detach(), 1.5 * base, rtol=1e-4, atol=1e-6)
    assert tis.metrics["rollout_corrected_fraction"] == 0
    torch.testing.assert_close(tis.metrics["rollout_logp_abs_diff"], torch.tensor(math.log(1.5)))
    # ratio e > cap 2: TIS caps every token at 2, MIS drops them all
    far = dataclasses.replace(batch, rollout_logprobs=batch.rollout_logprobs - 1.0)
    capped = algo.compute_loss(model, far)
    torch.testing.assert_close(capped.total.detach(), 2.0 * base, rtol=1e-4, atol=1e-6)
    assert capped.metrics["rollout_corrected_fraction"] == 1
    algo.cfg.grpo = dataclasses.replace(g, rollout_correction="mis")
    assert algo.compute_loss(model, far).total.item() == 0.0


def test_config_combinations_that_cannot_work_are_named(tiny_model_dir, arithmetic_dir, tmp_path):
    with pytest.raises(ConfigError, match="gspo_token"):
        build(
            tiny_model_dir,
            arithmetic_dir,
            tmp_path,
            **{"grpo.loss_type": "gspo", "grpo.advantage": "reinforce_pp"},
        )
    # Kimi is its own trainer (`posttrain kimi`, no advantage or rollout_correction keys)
    with pytest.raises(ConfigError, match="posttrain kimi"):
        build(
            tiny_model_dir,
            arithmetic_dir,
            tmp_path,
            **{"grpo.loss_type": "kimi", "grpo.advantage": "rloo"},
        )
    with pytest.raises(ConfigError, match="rollout_correction_cap"):
        build(
            tiny_model_dir,
            arithmetic_dir,
            tmp_path,
            **{"grpo.rollout_correction": "tis", "grpo.rollout_correction_cap": 0.5},
        )


@pytest.mark.slow  # the in-process tests above cover the training; this is the CLI path
def test_cli_gspo_rloo_tis_logs_mismatch_metrics(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "gspo"
    extra = {
        "grpo.loss_type": "gspo",
        "grpo.advantage": "rloo",
        "grpo.rollout_correction": "tis",
        "grpo.rewards": PARTIAL_CREDIT,
    }
    r = run_cli(
        "grpo",
        "recipes/grpo_tiny.yaml",
        *rl_overrides(tiny_model_dir, arithmetic_dir, out, **extra),
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("rollout_logp_abs_diff", "rollout_corrected_fraction", "clip_fraction"):
        assert key in last, key


@pytest.mark.slow
def test_reinforce_pp_two_processes_match_one(tiny_model_dir, arithmetic_dir, tmp_path):
    """REINFORCE++ normalises over the GLOBAL batch: two processes holding half of it each must
    give the single process's losses (without the all-reduce each would use its own stats)."""
    from cli_helpers import run_torchrun

    common = {
        "train.max_steps": 2,
        "optim.lr": 1e-3,
        "grpo.beta": 0.04,
        "grpo.loss_type": "gspo_token",
        "grpo.advantage": "reinforce_pp",
        "data.eval_path": "",
        "grpo.rewards": PARTIAL_CREDIT,
    }
    env = {"PYTHONPATH": str(tmp_path)}
    single = run_cli(
        "grpo",
        "recipes/grpo_tiny.yaml",
        *rl_overrides(tiny_model_dir, arithmetic_dir, tmp_path / "one", **common),
        env=env,
    )
    assert single.returncode == 0, single.stderr
    args = rl_overrides(
        tiny_model_dir, arithmetic_dir, tmp_path / "two", **common, **{"train.batch_size": 8}
    )
    two = run_torchrun("grpo", "recipes/grpo_tiny.yaml", *args, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one_records, two_records = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    )
    # Normalised returns of equal-length completions average to 0, so the loss VALUE is ~0 on
    # both; the gradient carries the advantages: its norm differs by ~3% with per-process stats.
    for a, b in zip(one_records, two_records, strict=True):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"], (a, b)
        assert abs(a["loss"] - b["loss"]) < 1e-4
