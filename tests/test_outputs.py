"""What a run leaves behind for users of the Hugging Face stack: intermediate checkpoints that
`from_pretrained` loads (train.save_hf_checkpoints), a model card in final/, and push_to_hub
checked before training (up to where the network is needed: no network here)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from cli_helpers import free_port, run_cli
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        check_hub_ready(cfg)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-posttrain-test")  # no stored token either
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent-posttrain-test/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", "/nonexistent-posttrain-test/tokens")
    with pytest.raises(HubError, match="no Hugging Face token"):
        check_hub_ready(cfg)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    # an endpoint where nothing listens: the connection is refused at once
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HubError, match="cannot be reached"):
        check_hub_ready(cfg)
