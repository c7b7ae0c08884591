"""Sharded training (FSDP2 through Accelerate) on 2 CPU processes (torchrun, gloo) equals one
process with the same global batch, really shards, writes a plain HF final/, resumes exactly;
and every launch that would silently train something else is an error."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import REPO, free_port, run_cli, run_torchrun, sft_overrides, show_failure
from safetensors.torch import load_file
from test_grpo import rl_overrides
from test_ppo import ppo_overrides
from test_preference import pref_overrides

pytestmark = pytest.mark.multiprocess


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "train_summary.json").read_text())


def assert_same_curves(one, two, keys=("loss",), tol=1e-4):
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in keys:
            assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (key, x["step"], a, b)


def assert_sharded(out):
    s = summary(out)
    assert s["sharding"] == "fsdp2" and s["num_processes"] == 2, s
    assert s["param_bytes_per_rank"] <= 0.6 * s["param_bytes_total"], s


def assert_final_matches(one, two, atol=1e-4):
    """Both final/ directories load in plain transformers and hold the same weights."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(one / "final")
    b = AutoModelForCausalLM.from_pretrained(two / "final")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)
    # the same files as an unsharded save (no extra tied copies)
    assert (
        load_file(one / "final" / "model.safetensors").keys()
        == load_file(two / "final" / "model.safetensors").keys()
    )


def one_and_two(command, recipe, overrides, tmp_path, common, one_batch, two_extra, env=None):
    """Run `command` on 1 process (batch `one_batch`) and on 2 torchrun processes (with
    `two_extra`, e.g. half the batch and a sharding), same global batch; returns both output
    directories and the 2-process output text. `overrides(out, **values)` builds the overrides."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli(
        command, recipe, *overrides(one, **common, **{"train.batch_size": one_batch}), env=env
    )
    assert single.returncode == 0, single.stderr
    sharded = run_torchrun(command, recipe, *overrides(two, **common, **two_extra), env=env)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    return one, two, sharded.stdout + sharded.stderr


def test_fsdp2_sft_matches_single_process(tiny_model_dir, arithmetic_dir, tmp_path):
    """Acceptance 1: 20 steps of sft_tiny, FSDP2 on 2 processes vs 1 process, same global batch."""
    common = {"train.max_steps": 20, "optim.lr": 3e-3, "logging.log_every": 1}
    one, two, _ = one_and_two(
        "sft",
        "recipes/sft_tiny.yaml",
        lambda out, **v: sft_overrides(tiny_model_dir, arithmetic_dir, out, **v),
        tmp_path,
        common,
        8,
        {"train.batch_size": 4, "train.sharding": "fsdp2"},
    )
    assert_sharded(two)
    assert_same_curves(one, two)
    assert records(one)[-1]["loss"] < records(one)[0]["loss"]
    assert_final_matches(one, two)


def test_fsdp2_dpo_matches_single_process(tiny_model_dir, arithmetic_dir, tmp_path):
    """The frozen reference is sharded too; evaluation pads the shorter rank's batches."""
    common = {"train.max_steps": 3, "optim.lr": 1e-3, "data.max_eval_examples": 13}
    one, two, _ = one_and_two(
        "dpo",
        "recipes/dpo_tiny.yaml",
        lambda out, **v: pref_overrides(tiny_model_dir, arithmetic_dir, out, **v),
        tmp_path,
        common,
        4,
        {"train.batch_size": 2, "train.sharding": "fsdp2"},
    )
    assert_sharded(two)
    assert_same_curves(one, two, keys=("loss", "eval/loss", "eval/rewards_accuracy")[:1])
    last_one, last_two = records(one)[-1], records(two)[-1]
    assert abs(last_one["eval/loss"] - last_two["eval/loss"]) < 1e-4
    assert_final_matches(one, two)


SPREAD_REWARD = (
    "def distinct(prompts, completions, **columns):\n"
    "    return [len(set(c)) / (1 + len(c)) for c in completions]\n"
)


def test_fsdp2_grpo_matches_single_process(tiny_model_dir, arithmetic_dir, tmp_path):
    """The rollout generates from the sharded policy (gathered once per rollout) and the KL
    reference is sharded; rewards, losses and updates equal one process."""
    (tmp_path / "spread_reward.py").write_text(SPREAD_REWARD)
    env = {"PYTHONPATH": str(tmp_path)}
    common = {
        "train.max_steps": 3,
        "optim.lr": 1e-3,
        "grpo.beta": 0.04,
        "data.eval_path": "",
        "grpo.rewards": "[{name: 'spread_reward:distinct'}]",
    }
    one, two, _ = one_and_two(
        "grpo",
        "recipes/grpo_tiny.yaml",
        lambda out, **v: rl_overrides(tiny_model_dir, arithmetic_dir, out, **v),
        tmp_path,
        common,
        16,
        {"train.batch_size": 8, "train.sharding": "fsdp2"},
        env=env,
    )
    assert_sharded(two)
    assert all(r["rewards/std"] > 0 for r in records(one))  # real advantages
    assert_same_curves(one, two, keys=("loss", "rewards/mean", "completion_length"))
    assert_final_matches(one, two)


def test_ppo_two_processes_match_one_with_two_minibatches(tiny_model_dir, arithmetic_dir, tmp_path):
    """Acceptance 3 (PPO parity) and 1 (PPO under FSDP2, critic sharded too): a rollout of 8
    rows in 2 minibatches of 4, 2 epochs; 2 processes (DDP and FSDP2) take the same steps."""
    (tmp_path / "spread_reward.py").write_text(SPREAD_REWARD)
    env = {"PYTHONPATH": str(tmp_path)}
    common = {
        "train.max_steps": 4,
        "optim.lr": 1e-3,
        "ppo.rewards": "[{name: 'spread_reward:distinct'}]",
    }
    one = tmp_path / "one"
    single = run_cli(
        "ppo",
        "recipes/ppo_tiny.yaml",
        *ppo_overrides(tiny_model_dir, arithmetic_dir, one, **common),
        env=env,
    )
    assert single.returncode == 0, single.stderr
    keys = ("loss", "value_loss", "policy_loss", "score")
    for sharding in ("none", "fsdp2"):
        two = tmp_path / sharding
        args = ppo_overrides(
            tiny_model_dir,
            arithmetic_dir,
            two,
            **common,
            **{"train.batch_size": 2, "train.sharding": sharding},
        )
        run = run_torchrun("ppo", "recipes/ppo_tiny.yaml", *args, env=env)
        assert run.returncode == 0, (sharding, run.stderr[-8000:])
        assert_same_curves(one, two, keys=keys)
        if sharding == "fsdp2":
            assert_sharded(two)
            assert_final_matches(one, two)
            critic_one = load_file(one / "critic" / "model.safetensors")
            critic_two = load_file(two / "critic" / "model.safetensors")
            assert critic_one.keys() == critic_two.keys()
            for k in critic_one:
                torch.testing.assert_close(critic_one[k], critic_two[k], atol=1e-4, rtol=0)


def test_fsdp2_resume_is_exact(tiny_model_dir, arithmetic_dir, tmp_path):
    """Acceptance 2: sharded checkpoints (torch distributed checkpoint); killed after the step-2
    save and resumed, the final weights equal the uninterrupted FSDP2 run within 1e-6."""
    extra = {
        "train.max_steps": 6,
        "train.save_every": 2,
        "train.keep_checkpoints": 3,
        "optim.lr": 3e-3,
        "train.batch_size": 4,
        "train.sharding": "fsdp2",
    }

    def launch(out, *more, env=None):
        args = sft_overrides(tiny_model_dir, arithmetic_dir, out, **extra)
        return run_torchrun("sft", "recipes/sft_tiny.yaml", *args, *more, env=env)

    full = launch(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = launch(tmp_path / "stopped", env={"POSTTRAIN_FAULT_INJECT": "sigkill_after_save:2"})
    assert stopped.returncode != 0
    assert not (tmp_path / "stopped" / "final").exists()
    ckpt = tmp_path / "stopped" / "checkpoints" / "step-0000002"
    assert any(p.suffix == ".distcp" for p in ckpt.rglob("*")), sorted(ckpt.rglob("*"))
    resumed = launch(tmp_path / "stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    steps = [r["step"] for r in records(tmp_path / "stopped")]
    assert steps == list(range(1, 7))


# ---- launches that must not silently train something else ------------------------------------


def _fails_with(result, *fragments):
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for fragment in fragments:
        assert fragment in text, text[-3000:]


@pytest.mark.parametrize(
    "env, override, fragments",
    [
        ({}, "fsdp2", ("train.sharding=fsdp2 needs a distributed launch",)),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "auto", ("FSDP version 1",)),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "auto",
            ("deepspeed_zero3 needs CUDA GPUs",),
        ),
        ({}, "deepspeed_zero2", ("deepspeed_zero2 needs CUDA GPUs",)),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            "none",
            ("train.sharding=none but the Accelerate launch config asks for fsdp2",),
        ),
        (
            # what `accelerate launch --cpu --num_processes 2` gives its ONE process
            {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
            "auto",
            ("starts only ONE process",),
        ),
    ],
)
def test_unhonourable_launch_is_an_error(
    tiny_model_dir, arithmetic_dir, tmp_path, env, override, fragments
):
    args = sft_overrides(
        tiny_model_dir, arithmetic_dir, tmp_path / "out", **{"train.sharding": override}
    )
    result = run_cli("sft", "recipes/sft_tiny.yaml", *args, env=env)
    _fails_with(result, *fragments)
    assert not (tmp_path / "out" / "final").exists()


def accelerate_launch(*args, timeout=600):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return show_failure(
        subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    )


def test_accelerate_launch_cpu_with_two_processes_is_an_error(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    """The real launcher: `--cpu --num_processes 2` starts one process; posttrain says so."""
    args = sft_overrides(tiny_model_dir, arithmetic_dir, tmp_path / "out")
    result = accelerate_launch(
        "--cpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "posttrain",
        "sft",
        "recipes/sft_tiny.yaml",
        *args,
    )
    # posttrain's process exits 2 with its one line; accelerate's launcher then reports the
    # failed child with its own traceback and exit status 1.
    assert result.returncode != 0
    assert "error: `accelerate launch --cpu` with several processes starts only ONE process" in (
        result.stdout + result.stderr
    )


# ---- the shipped Accelerate configs -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, distributed_type, sharding",
    [
        ("ddp", "MULTI_GPU", None),
        ("fsdp2", "FSDP", "fsdp2"),
        ("deepspeed_zero2", "DEEPSPEED", "deepspeed_zero2"),
        ("deepspeed_zero3", "DEEPSPEED", "deepspeed_zero3"),
    ],
)
def test_shipped_accelerate_configs_mean_what_they_say(
    name, distributed_type, sharding, monkeypatch
):
    """Accelerate's own loader reads each file; the environment its launcher derives from it
    (the fields posttrain reads) maps to the sharding the file's name promises."""
    from accelerate.commands.config.config_args import load_config_from_file

    from posttrain.train.distributed import launcher_sharding

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(distributed_type)
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", str(config.fsdp_config["fsdp_version"]))
    if distributed_type == "DEEPSPEED":
        stage = config.deepspeed_config["zero_stage"]
        assert name.endswith(str(stage))
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
        if stage == 3:
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    assert launcher_sharding() == sharding


@pytest.mark.parametrize("name, sharding", [("fsdp2", "fsdp2"), ("ddp", "none")])
def test_accelerate_launch_with_shipped_config_on_cpu(
    name, sharding, tiny_model_dir, arithmetic_dir, tmp_path
):
    """`accelerate launch --config_file recipes/accelerate/NAME.yaml` really starts 2 processes
    and trains with what the file asks for (FSDP2 on CPU through posttrain's gloo path)."""
    out = tmp_path / "out"
    args = sft_overrides(tiny_model_dir, arithmetic_dir, out, **{"train.max_steps": 2})
    result = accelerate_launch(
        "--config_file",
        f"recipes/accelerate/{name}.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "posttrain",
        "sft",
        "recipes/sft_tiny.yaml",
        *args,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    s = summary(out)
    assert s["sharding"] == sharding and s["num_processes"] == 2, s


def test_fsdp2_with_gradient_checkpointing_and_offload_keys(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    """model.gradient_checkpointing and train.cpu_offload compose with FSDP2 (on CPU the
    offload steps aside with a notice: the shards are in CPU memory already)."""
    common = {"train.max_steps": 3, "optim.lr": 3e-3}
    two_extra = {
        "train.batch_size": 4,
        "train.sharding": "fsdp2",
        "train.cpu_offload": "true",
        "model.gradient_checkpointing": "true",
    }
    one, two, output = one_and_two(
        "sft",
        "recipes/sft_tiny.yaml",
        lambda out, **v: sft_overrides(tiny_model_dir, arithmetic_dir, out, **v),
        tmp_path,
        common,
        8,
        two_extra,
    )
    assert "shards are in CPU memory already" in output
    assert_sharded(two)
    assert_same_curves(one, two)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, recipe, data, extra",
    [
        ("rm", "rm_tiny.yaml", "preference", {"data.max_eval_examples": 13}),
        ("sft", "sft_tiny_lora.yaml", "sft", {}),
        ("sft", "sft_tiny_moe.yaml", "sft", {}),
        (
            "kimi",
            "kimi_tiny.yaml",
            "rl",
            {
                "kimi.prompts_per_step": 4,
                "kimi.num_generations": 4,
                "kimi.max_new_tokens": 6,
                "train.batch_size": 8,
                "data.max_eval_examples": 7,
            },
        ),
    ],
)
def test_fsdp2_other_trainers_and_models(
    command, recipe, data, extra, tiny_model_dir, arithmetic_dir, tmp_path
):
    """rm, kimi, a LoRA policy and an MoE model train sharded and write a loadable final/
    (uneven evaluation shares included)."""
    from posttrain.models.presets import init_model

    model_dir = tiny_model_dir
    if "moe" in recipe:
        model_dir = init_model(tmp_path / "tiny-moe", "tiny", arch="qwen3_moe")
    train = {
        "sft": "sft_train.jsonl",
        "preference": "preference_train.jsonl",
        "rl": "rl_train.jsonl",
    }
    evals = {"preference": "preference_test.jsonl", "rl": "rl_test.jsonl"}
    out = tmp_path / "out"
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": arithmetic_dir / train[data],
        "data.eval_path": arithmetic_dir / evals[data] if data in evals else "",
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.sharding": "fsdp2",
        "logging.progress": "false",
        **extra,
    }
    result = run_torchrun(command, f"recipes/{recipe}", *[f"{k}={v}" for k, v in values.items()])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_sharded(out)
    files = {p.name for p in (out / "final").iterdir()}
    assert (
        "adapter_model.safetensors" in files if "lora" in recipe else "model.safetensors" in files
    )
