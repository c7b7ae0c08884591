"""Multi-token prediction heads (training, saving, loading) and self-speculative rollouts."""

import json
import math

import pytest
import torch
from cli_helpers import run_cli, sft_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import MTPConfig
from posttrain.losses.mtp import mtp_loss
from posttrain.models.mtp import MTPCausalLM, MTPHeads, build_heads, load_heads
from posttrain.rollout import RolloutEngine, SamplingParams, sequence_logprobs

KINDS = ["medusa", "deepseek"]


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def random_heads(model, kind: str, depth: int = 3, seed: int = 0) -> MTPHeads:
    """Untrained heads; Medusa's zero init is perturbed so its drafts are often wrong."""
    torch.manual_seed(seed)
    heads = MTPHeads(model.config, MTPConfig(kind=kind, depth=depth))
    if kind == "medusa":
        for layer in heads.medusa:
            torch.nn.init.normal_(layer.weight, std=0.3)
    return heads.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_head_k_is_trained_on_the_token_k_plus_1_ahead(model, kind):
    # Only the heads train, on one fixed sequence: head k at position i must come to predict
    # token i+k+2, which only happens if the loss targets are shifted by k+1 through the module.
    model.requires_grad_(False)
    wrapped = MTPCausalLM(model, random_heads(model, kind, depth=2))
    ids = torch.tensor([[7, 31, 12, 45, 60, 23, 88, 14, 9, 71, 33, 52]])
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)  # aligned labels
    optimizer = torch.optim.Adam(wrapped.heads.parameters(), lr=1e-2)
    for _ in range(80):
        _, head_logits = wrapped(input_ids=ids, use_cache=False)
        loss = mtp_loss(head_logits, labels, weight=1.0)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    _, head_logits = wrapped(input_ids=ids, use_cache=False)
    for k, logits in enumerate(head_logits):
        predicted = logits[0, : ids.shape[1] - k - 2].argmax(-1)
        assert predicted.tolist() == ids[0, k + 2 :].tolist()
        assert loss.metrics[f"mtp_acc_{k}"] > 0.9


def test_deepseek_heads_respect_causality_and_packing(model):
    wrapped = MTPCausalLM(model, random_heads(model, "deepseek", depth=2))
    a, b = [5, 17, 29, 41, 53], [8, 19, 27, 36]
    with torch.no_grad():
        _, alone = wrapped(input_ids=torch.tensor([b]), use_cache=False)
        packed_ids = torch.tensor([a + b])
        positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
        _, packed = wrapped(input_ids=packed_ids, position_ids=positions, use_cache=False)
        changed = packed_ids.clone()
        changed[0, 3] = 99
        _, perturbed = wrapped(input_ids=changed, position_ids=positions, use_cache=False)
    for k in range(2):
        # the second example does not see the first one
        torch.testing.assert_close(packed[k][0, len(a) :], alone[k][0], atol=1e-5, rtol=1e-5)
        # head k at position i reads tokens up to i+k+1 only
        torch.testing.assert_close(perturbed[k][0, : 3 - k - 1], packed[k][0, : 3 - k - 1])
        assert not torch.allclose(perturbed[k][0, 3 - k - 1], packed[k][0, 3 - k - 1])


def test_sft_with_mtp_cli_logs_saves_and_reloads_heads(tiny_model_dir, arithmetic_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "sft",
        "recipes/sft_tiny_mtp.yaml",
        *sft_overrides(
            tiny_model_dir,
            arithmetic_dir,
            out,
            **{"data.eval_path": arithmetic_dir / "sft_test.jsonl", "data.max_eval_examples": 32},
        ),
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "main_loss", "token_accuracy", "mtp/loss_1", "mtp/acc_1", "mtp/loss_2"):
        assert key in records[0], key
    assert records[0]["loss"] > records[0]["main_loss"]  # the MTP term is added
    assert "eval/mtp/acc_2" in records[-1]

    final = out / "final"
    assert (final / "mtp_heads.safetensors").is_file()
    assert json.loads((final / "mtp_config.json").read_text())["kind"] == "deepseek"
    # plain transformers loads the base model with no unexpected or missing keys
    plain, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    heads = load_heads(plain, final)
    assert heads.kind == "deepseek" and heads.depth == 2
    # a later recipe that asks for the same heads gets the trained ones, not a fresh init
    again = build_heads(plain, MTPConfig(kind="deepseek", depth=2), final)
    for (name, p), q in zip(heads.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="depth=2"):
        build_heads(plain, MTPConfig(kind="deepseek", depth=3), final)


PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    "Short text",
    [1, 20, 30, 40, 50, 60, 70],
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["plain", "n3_stop"])
def test_speculative_greedy_is_token_identical(model, tokenizer, kind, case):
    engine = RolloutEngine(model, tokenizer, mtp_heads=random_heads(model, kind))
    common = dict(temperature=0.0, max_new_tokens=23)
    if case == "n3_stop":
        common.update(n=3, stop=["e"])
    plain = engine.generate(PROMPTS, SamplingParams(**common))
    spec = engine.generate(PROMPTS, SamplingParams(**common, speculative="mtp"))
    stats = engine.last_stats
    assert spec.completion_ids.tolist() == plain.completion_ids.tolist()
    assert spec.completion_mask.tolist() == plain.completion_mask.tolist()
    assert spec.truncated.tolist() == plain.truncated.tolist() and spec.texts == plain.texts
    torch.testing.assert_close(spec.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    assert stats["forward_passes"] < 23 + 1  # at most one forward per token, plus prefill
    assert 0 <= stats["accept_rate_3"] <= stats["accept_rate_1"] <= 1


def test_speculative_greedy_with_eos_matches(model, tokenizer):
    # a frequent token as EOS, so rows finish at different steps inside accepted drafts
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 71]
    engine = RolloutEngine(model, tokenizer, mtp_heads=random_heads(model, "medusa", seed=1))
    params = dict(temperature=0.0, max_new_tokens=30, n=2)
    plain = engine.generate(PROMPTS, SamplingParams(**params))
    spec = engine.generate(PROMPTS, SamplingParams(**params, speculative="mtp"))
    assert spec.completion_ids.tolist() == plain.completion_ids.tolist()
    assert spec.truncated.tolist() == plain.truncated.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_speculative_logprobs_are_the_main_models(model, tokenizer, kind):
    engine = RolloutEngine(model, tokenizer, mtp_heads=random_heads(model, kind))
    for temperature in (0.0, 0.7):
        params = SamplingParams(
            n=3, temperature=temperature, max_new_tokens=16, seed=3, speculative="mtp"
        )
        batch = engine.generate(PROMPTS, params)
        forced = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            temperature=temperature,
        )
        torch.testing.assert_close(batch.logprobs, forced, atol=1e-4, rtol=0)


def chi_square_critical(df: int) -> float:
    """0.999 quantile of chi-square (Wilson-Hilferty), so a correct sampler fails 1 in 1000."""
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("kind", KINDS)
def test_speculative_sampling_follows_the_main_model(model, tokenizer, kind):
    # top_k=3 keeps the support small: the exact marginal of the 2nd and 3rd token is a sum
    # over 3 and 9 prefixes, computed by teacher forcing and compared with 3000 samples.
    heads = random_heads(model, kind)
    prompt = [1, 20, 30, 40]
    params = SamplingParams(n=3000, temperature=1.0, top_k=3, max_new_tokens=3, seed=11)
    engine = RolloutEngine(model, tokenizer, mtp_heads=heads)
    batch = engine.generate([prompt], SamplingParams(**{**params.__dict__, "speculative": "mtp"}))
    assert batch.lengths.min() == 3  # no EOS among the likely tokens of this model
    if kind == "medusa":  # both branches of the rule run: some drafts accepted, some not
        assert 0.05 < engine.last_stats["accept_rate_1"] < 0.95

    def filtered(prefix):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + prefix])).logits[0, -1]
        top = logits.topk(3)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    marginal = {(): 1.0}
    for position in range(3):
        next_marginal = {}
        for prefix, weight in marginal.items():
            for token, prob in filtered(list(prefix)).items():
                next_marginal[prefix + (token,)] = weight * prob
        marginal = next_marginal
        expected: dict[int, float] = {}
        for prefix, weight in marginal.items():
            expected[prefix[-1]] = expected.get(prefix[-1], 0.0) + weight
        observed = torch.bincount(batch.completion_ids[:, position], minlength=len(tokenizer))
        total = len(batch)
        assert sum(int(observed[t]) for t in expected) == total  # nothing outside the top-3s
        stat = sum((int(observed[t]) - total * p) ** 2 / (total * p) for t, p in expected.items())
        assert stat < chi_square_critical(max(len(expected) - 1, 1)), (position, stat)
