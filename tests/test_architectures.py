"""The architecture matrix (issue 12): for every common family, each fast path gives the plain
path's numbers (fp32, 1e-5) or reports itself disabled for that family.

Tiny random models come from each family's transformers config class (tests/arch_models.py),
saved and loaded back through posttrain's loader. Sequences are longer than the 16-token
sliding windows, so a fast path that ignored a window would fail here (Gemma3 did: up to 0.148
on the shared-prompt GRPO forward); OPT ignores restarting position_ids, so packed SFT rows
would attend across examples without the explicit block mask.
"""

from __future__ import annotations

import pytest
import torch
from arch_models import FAMILIES, attn_of, build_family

from posttrain.algorithms.dpo import completion_logps
from posttrain.algorithms.reward_model import packed_scores
from posttrain.algorithms.sft import collate_sft
from posttrain.config import ModelConfig
from posttrain.data.encoding import EncodedExample
from posttrain.data.preference import PreferenceExample, preference_collate
from posttrain.data.preference_packing import packed_preference_collate
from posttrain.losses.sft import cross_entropy_loss
from posttrain.models import attention_support
from posttrain.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer
from posttrain.rollout import RolloutEngine, SamplingParams, sequence_logprobs

ATOL = 1e-5


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    from posttrain.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=512)
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_family(family, root / family, tokenizer)
        return cache[family]

    return get


def _load(path, dtype="float32"):
    cfg = ModelConfig(name_or_path=str(path), attn_implementation=attn_of(path), dtype=dtype)
    return cfg, load_causal_lm(cfg).eval(), load_tokenizer(str(path))


def _ids(n: int, seed: int, vocab: int = 200) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_packed_equals_padded(family_dirs, family):
    _, model, tok = _load(family_dirs(family))
    prof = attention_support.profile(model)
    mode, reason = attention_support.sft_packing(prof)
    if family == "opt":
        assert mode == "block_mask"  # OPT's mask builder is not given position_ids
    if mode == "padded":
        assert reason, "a fast path that steps aside must say why"
        return
    examples = [
        EncodedExample(ids, [0] * 5 + [1] * (len(ids) - 5))
        for ids in (_ids(40, 1), _ids(23, 2), _ids(9, 3), _ids(31, 4))
    ]
    padded = collate_sft(examples, tok.pad_token_id, 128, "padded", prof)
    packed = collate_sft(examples, tok.pad_token_id, 128, mode, prof)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # really packed

    def loss(batch):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        return cross_entropy_loss(logits, batch.labels)

    with torch.no_grad():
        want, got = loss(padded), loss(packed)
    assert int(got.units) == int(want.units)
    torch.testing.assert_close(got.total, want.total, atol=ATOL * int(want.units), rtol=1e-5)


def _pairs() -> list[PreferenceExample]:
    out = []
    for k, (p, c, r) in enumerate([(30, 12, 7), (8, 20, 25), (19, 5, 5)]):
        prompt = _ids(p, 10 + k)
        chosen, rejected = prompt + _ids(c, 20 + k), prompt + _ids(r, 30 + k)
        out.append(
            PreferenceExample(chosen, [0] * p + [1] * c, rejected, [0] * p + [1] * r, margin=0.0)
        )
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_packed_equals_padded(family_dirs, family):
    _, model, tok = _load(family_dirs(family))
    if reason := attention_support.reason_off(model, "custom_mask"):
        assert family not in ("llama", "gemma3-window", "mistral-window"), reason
        return
    pairs = _pairs()
    with torch.no_grad():
        want, _ = completion_logps(model, preference_collate(pairs, tok.pad_token_id))
        got, _ = completion_logps(model, packed_preference_collate(pairs, tok.pad_token_id, 64))
    torch.testing.assert_close(got, want, atol=ATOL * 50, rtol=1e-5)  # sums of ~30 tokens


@pytest.mark.parametrize(
    "family",
    ["llama", "gemma2-softcap", "gemma3-window", "mistral-window", "opt", "gpt2", "qwen3-moe"],
)
def test_rm_packed_scores_equal_padded(family_dirs, family):
    path = family_dirs(family)
    tok = load_tokenizer(str(path))
    cfg = ModelConfig(name_or_path=str(path), attn_implementation=attn_of(path))
    model = load_sequence_classifier(cfg, tok.pad_token_id).eval()
    torch.nn.init.normal_(model.score.weight, std=0.5)
    pairs = _pairs()
    padded = preference_collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
        got = packed_scores(model, packed_preference_collate(pairs, tok.pad_token_id, 64))
    torch.testing.assert_close(got, want.reshape(-1), atol=ATOL, rtol=1e-5)


def _rollout_rows(G: int = 4, C: int = 14):
    """Two left-padded prompts (24 and 17 real tokens) x G completions, right-padded."""
    prompts = [_ids(24, 40), _ids(17, 41)]
    P = max(map(len, prompts))
    prompt_ids = torch.zeros(2 * G, P, dtype=torch.long)
    prompt_mask = torch.zeros(2 * G, P, dtype=torch.long)
    completion_ids = torch.zeros(2 * G, C, dtype=torch.long)
    completion_mask = torch.zeros(2 * G, C, dtype=torch.long)
    for row in range(2 * G):
        prompt = prompts[row // G]
        prompt_ids[row, P - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[row, P - len(prompt) :] = 1
        length = C - (row % 3)
        completion_ids[row, :length] = torch.tensor(_ids(length, 50 + row))
        completion_mask[row, :length] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grpo_shared_forward_equals_per_sample(family_dirs, family):
    _, model, _ = _load(family_dirs(family))
    rows = _rollout_rows()
    with torch.no_grad():
        want = sequence_logprobs(model, *rows, group_size=1)
        got = sequence_logprobs(model, *rows, group_size=4)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_greedy_matches_hf_generate_and_forward(family_dirs, family):
    _, model, tok = _load(family_dirs(family))
    prompts = [_ids(22, 60), _ids(9, 61)]
    engine = RolloutEngine(model, tok)
    max_new = 12
    params = SamplingParams(temperature=0, max_new_tokens=max_new, n=2)
    batch = engine.generate(prompts, params)
    for g, prompt in enumerate(prompts):
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=tok.pad_token_id,
        )
        want = out[0, len(prompt) :].tolist()
        for row in (2 * g, 2 * g + 1):
            n = int(batch.lengths[row])
            assert batch.completion_ids[row, :n].tolist() == want[:n]
    with torch.no_grad():
        forward = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
        )
    torch.testing.assert_close(batch.logprobs, forward, atol=ATOL, rtol=0)


# What main did before issue 12, shown to be wrong on these families: the equalities above are
# sensitive to it (they fail when the window / block mask is dropped).


def test_opt_packing_without_block_mask_attends_across_examples(family_dirs):
    _, model, tok = _load(family_dirs("opt"))
    prof = attention_support.profile(model)
    examples = [EncodedExample(_ids(n, n), [1] * n) for n in (40, 23, 9)]
    padded = collate_sft(examples, tok.pad_token_id, 128, "padded", prof)
    leaky = collate_sft(examples, tok.pad_token_id, 128, "positions", prof)  # no mask: main

    def total(batch):
        with torch.no_grad():
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
        return cross_entropy_loss(logits, batch.labels).total

    assert (total(leaky) - total(padded)).abs() > 1e-3


def test_gemma3_shared_forward_without_windows_differs(family_dirs, monkeypatch):
    import dataclasses

    _, model, _ = _load(family_dirs("gemma3-window"))
    rows = _rollout_rows()
    with torch.no_grad():
        want = sequence_logprobs(model, *rows, group_size=1)
        unwindowed = dataclasses.replace(attention_support.profile(model), window=None)
        monkeypatch.setattr(attention_support, "profile", lambda m: unwindowed)  # main's mask
        got = sequence_logprobs(model, *rows, group_size=4)
    assert (got - want).abs().max() > 1e-3


def test_start_up_notice_names_the_path_and_reason(family_dirs):
    _, model, _ = _load(family_dirs("gemma3-window"))
    lines = []
    assert not attention_support.fast_path(model, "shared_decode", lines.append)
    assert attention_support.fast_path(model, "custom_mask", lines.append)
    assert lines == [
        "note: the prompt-shared decode attention is off for gemma3_text: "
        "sliding-window layers keep their own cache"
    ]
