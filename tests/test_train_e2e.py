"""End-to-end SFT through the real CLI on a tiny model made in the test."""

import json

import torch
from cli_helpers import run_cli, sft_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_sft_cli_trains_saves_and_generates(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "sft",
        "recipes/sft_tiny.yaml",
        *sft_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{
                "train.max_steps": 12,
                "data.eval_path": arithmetic_dir / "sft_test.jsonl",
                "train.eval_every": 6,
                "optim.lr": 3e-3,
            },
        ),
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time"):
        assert key in records[0]
    assert records[-1]["loss"] < records[0]["loss"]
    assert "eval/loss" in records[5] and "eval/loss" in records[-1]
    assert (out / "config.yaml").is_file()

    # The output is a plain Hugging Face checkpoint: load it without posttrain and generate.
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 34?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]

    # Every parameter moved (TRL's smoke check): nothing was frozen by accident.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, p), (_, q) in zip(base.named_parameters(), model.named_parameters()):
        assert not torch.equal(p, q), f"{name} did not change"
