"""What a run leaves behind for users of the Hugging Face stack: intermediate checkpoints that
`from_pretrained` loads (train.save_hf_checkpoints), a model card in final/, and push_to_hub
checked before training (up to where the network is needed: no network here)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from cli_helpers import free_port, run_cli, run_torchrun
from transformers import AutoModelForCausalLM

from posttrain.config import TrainConfig
from posttrain.train.hub import HubError, check_hub_ready


def _weights(path) -> dict:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, arithmetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    done = run_cli(
        "sft",
        "recipes/sft_tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={arithmetic_dir / 'sft_train.jsonl'}",
        f"data.eval_path={arithmetic_dir / 'sft_test.jsonl'}",
        "data.max_eval_examples=16",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_checkpoints=2",
        "train.eval_every=0",
        "train.batch_size=8",
        "train.save_hf_checkpoints=true",
        "logging.log_every=2",
        "logging.progress=false",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_checkpoints_load_with_from_pretrained(sft_run):
    step2 = sft_run / "checkpoints" / "step-0000002" / "hf"
    step4 = sft_run / "checkpoints" / "step-0000004" / "hf"
    final = _weights(sft_run / "final")
    at_end, earlier = _weights(step4), _weights(step2)
    assert at_end.keys() == final.keys()
    assert all(torch.equal(at_end[k], final[k]) for k in final)  # step 4 is the last step
    assert any(not torch.equal(earlier[k], final[k]) for k in final)  # two more steps trained
    assert (step4 / "tokenizer_config.json").is_file()
    assert (sft_run / "checkpoints" / "step-0000004" / "complete.json").is_file()


def test_model_card_in_final(sft_run, tiny_model_dir, arithmetic_dir):
    card = (sft_run / "final" / "README.md").read_text()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(header)["tags"] == ["posttrain", "sft"]
    assert "base_model" not in yaml.safe_load(header)  # a local path is no hub id
    assert f"**Base model**: `{tiny_model_dir.resolve()}`" in body
    assert f"`{(arithmetic_dir / 'sft_train.jsonl').resolve()}`" in body
    last = json.loads((sft_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"| loss | {last['loss']:.6g} |" in body
    assert "| eval/loss |" in body
    recipe = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe == yaml.safe_load((sft_run / "config.yaml").read_text())


def test_model_card_names_a_hub_base_model(tmp_path):
    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import from_dict
    from posttrain.train.model_card import model_card

    cfg = from_dict(ALGORITHMS["dpo"][0], {"model": {"name_or_path": "Qwen/Qwen3-0.6B"}})
    card = model_card(cfg, "dpo", 10, {"loss": 0.5, "eval/accuracy": float("nan")})
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "Qwen/Qwen3-0.6B"
    assert "| loss | 0.5 |" in card and "eval/accuracy" not in card


def test_push_to_hub_offline_fails_before_training(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "sft",
        "recipes/sft_tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={arithmetic_dir / 'sft_train.jsonl'}",
        f"train.output_dir={out}",
        "train.push_to_hub=true",
        "train.hub_model_id=someone/tiny-sft",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "someone/tiny-sft" in lines[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_push_to_hub_checks(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_hub_ready(TrainConfig())  # push_to_hub off: nothing to check
    with pytest.raises(HubError, match="hub_model_id as 'user/name'"):
        check_hub_ready(TrainConfig(push_to_hub=True))
    cfg = TrainConfig(push_to_hub=True, hub_model_id="someone/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        check_hub_ready(cfg)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-posttrain-test")  # no stored token either
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent-posttrain-test/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", "/nonexistent-posttrain-test/tokens")
    with pytest.raises(HubError, match="no Hugging Face token"):
        check_hub_ready(cfg)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    # an endpoint where nothing listens: the connection is refused at once
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HubError, match="but cannot reach http"):
        check_hub_ready(cfg)


@pytest.mark.multiprocess
def test_fsdp2_hf_checkpoints_and_sharded_evaluation(
    tiny_model_dir, arithmetic_dir, tmp_path, monkeypatch
):
    """2 torchrun processes under FSDP2: step-N/hf is gathered like final/ (the same tensors,
    no tied duplicates), and the evaluation section's reward, summed over the processes' shares,
    equals `posttrain eval` of final/ on one process."""
    from safetensors.torch import load_file

    from posttrain.config import RewardFunctionConfig
    from posttrain.evaluation import evaluate_model

    (tmp_path / "outputs_length_reward.py").write_text(
        "def length(prompts, completions, answer, **columns):\n"
        "    return [len(c) / 10 + float(a) / 100 for c, a in zip(completions, answer)]\n"
    )
    pythonpath = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    out = tmp_path / "run"
    eval_path = arithmetic_dir / "sft_test.jsonl"
    done = run_torchrun(
        "sft",
        "recipes/sft_tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={arithmetic_dir / 'sft_train.jsonl'}",
        f"data.eval_path={eval_path}",
        "data.max_eval_examples=7",  # odd: the processes' shares differ in size
        f"train.output_dir={out}",
        "train.sharding=fsdp2",
        "train.max_steps=2",
        "train.save_every=1",
        "train.batch_size=4",
        "train.save_hf_checkpoints=true",
        "logging.log_every=1",
        "logging.progress=false",
        "evaluation.metric=reward",
        "evaluation.rewards=[{name: 'outputs_length_reward:length'}]",
        "evaluation.max_new_tokens=4",
        env={"PYTHONPATH": pythonpath},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    step2 = out / "checkpoints" / "step-0000002" / "hf"
    final = load_file(out / "final" / "model.safetensors")
    gathered = load_file(step2 / "model.safetensors")
    assert gathered.keys() == final.keys()
    assert all(torch.equal(gathered[k], final[k]) for k in final)
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-0000001" / "hf")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    monkeypatch.syspath_prepend(str(tmp_path))
    single = evaluate_model(
        str(out / "final"),
        str(eval_path),
        4,
        limit=7,
        metric="reward",
        rewards=[RewardFunctionConfig(name="outputs_length_reward:length")],
    )
    assert single["reward"] > 0 and single["n"] == 7
    assert last["eval/reward"] == pytest.approx(single["reward"], abs=1e-6)
