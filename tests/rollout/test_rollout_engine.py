"""RolloutEngine against Hugging Face `generate` on a real tiny Llama, plus its invariants:
layout of the n samples, masks, truncation, stop strings, seeding, one prefill per prompt and
finished rows leaving the batch."""

from __future__ import annotations

import pytest
import torch

from posttrain.rollout import RolloutBatch, RolloutEngine, SamplingParams


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids) :].tolist()
    logits = torch.cat(out.logits)  # (steps, V)
    return new, logits.float().log_softmax(-1).gather(-1, torch.tensor(new)[:, None]).squeeze(-1)


@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_matches_hf_generate(model, tokenizer, prompts, extra_eos, with_eos):
    engine = RolloutEngine(model, tokenizer)
    max_new = 20
    if with_eos:
        # Row 0 emits its greedy 4th token early; making that an EOS finishes row 0 at step 4
        # while the others go on, so row removal is exercised against the reference.
        first = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
        extra_eos(model, tokenizer, [int(first.completion_ids[0, 3])])
    batch = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
    lengths = batch.lengths.tolist()
    for i, prompt in enumerate(prompts):
        expected, expected_logprobs = hf_greedy(model, engine.encode(prompt), max_new)
        assert batch.completion_ids[i, : lengths[i]].tolist() == expected
        torch.testing.assert_close(
            batch.logprobs[i, : lengths[i]], expected_logprobs, atol=1e-4, rtol=0
        )
    if with_eos:
        assert lengths[0] <= 4 and not batch.truncated[0]


def test_chunking_does_not_change_greedy_output(model, tokenizer, prompts):
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    whole = RolloutEngine(model, tokenizer, max_batch_prompts=64).generate(prompts, params)
    chunked = RolloutEngine(model, tokenizer, max_batch_prompts=3).generate(prompts, params)
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    assert torch.equal(whole.prompt_ids, chunked.prompt_ids)
    assert whole.texts == chunked.texts


def test_seed_reproducible(model, tokenizer, prompts):
    engine = RolloutEngine(model, tokenizer)
    params = dict(n=3, temperature=1.0, max_new_tokens=12)
    a = engine.generate(prompts, SamplingParams(**params, seed=1))
    b = engine.generate(prompts, SamplingParams(**params, seed=1))
    c = engine.generate(prompts, SamplingParams(**params, seed=2))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # The n samples of one prompt are drawn independently.
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])


def test_prompt_seeds_make_samples_independent_of_the_other_prompts(model, tokenizer, prompts):
    engine = RolloutEngine(model, tokenizer, max_batch_prompts=2)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=0)
    seeds = [101, 102, 103, 104]
    together = engine.generate(prompts, params, prompt_seeds=seeds)
    # Prompt 2 alone, in a different chunk layout and with another params.seed: same samples.
    params.seed = 99
    alone = engine.generate([prompts[2]], params, prompt_seeds=[seeds[2]])
    assert together.texts[6:9] == alone.texts
    assert torch.equal(
        together.completion_ids[6:9, : alone.completion_ids.shape[1]], alone.completion_ids
    )
    with pytest.raises(ValueError, match="prompt_seeds"):
        engine.generate(prompts, params, prompt_seeds=seeds[:2])


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_top_k_one_and_tiny_top_p_are_greedy(model, tokenizer, prompts, filters):
    engine = RolloutEngine(model, tokenizer)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    sampled = engine.generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=10, seed=0, **filters)
    )
    assert torch.equal(greedy.completion_ids, sampled.completion_ids)


def test_layout_masks_and_truncation(model, tokenizer, prompts, extra_eos):
    eos_ids = extra_eos(model, tokenizer, many=True)
    engine = RolloutEngine(model, tokenizer)
    n, max_new = 3, 16
    batch = engine.generate(
        prompts, SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, seed=0)
    )
    rows = len(prompts) * n
    assert len(batch) == rows and len(batch.texts) == rows
    assert batch.group_ids.tolist() == [g for g in range(len(prompts)) for _ in range(n)]
    for g, prompt in enumerate(prompts):
        ids = engine.encode(prompt)
        for r in range(g * n, (g + 1) * n):
            real = batch.prompt_ids[r][batch.prompt_mask[r].bool()].tolist()
            assert real == ids
            assert batch.prompt_mask[r, -len(ids) :].all()  # left-padded
    assert batch.truncated.any() and (~batch.truncated).any(), "want both kinds of rows"

    for r in range(rows):
        length = int(batch.lengths[r])
        mask = batch.completion_mask[r].tolist()
        assert mask == [1] * length + [0] * (batch.completion_ids.shape[1] - length)
        generated = batch.completion_ids[r, :length].tolist()
        assert (batch.completion_ids[r, length:] == tokenizer.pad_token_id).all()
        assert (batch.logprobs[r, length:] == 0).all() and (batch.logprobs[r, :length] < 0).all()
        if batch.truncated[r]:
            assert length == max_new and not set(generated) & set(eos_ids)
        else:
            assert generated[-1] in eos_ids and not set(generated[:-1]) & set(eos_ids)
        assert batch.texts[r] == tokenizer.decode(generated, skip_special_tokens=True)
    assert engine.last_stats["generated_tokens"] == int(batch.lengths.sum())


def test_select_split_and_to(model, tokenizer, prompts):
    batch = RolloutEngine(model, tokenizer).generate(
        prompts, SamplingParams(n=2, max_new_tokens=6, seed=0)
    )
    picked = batch.select(torch.tensor([5, 0]))
    assert picked.group_ids.tolist() == [2, 0] and picked.texts == [batch.texts[5], batch.texts[0]]
    assert torch.equal(picked.completion_ids[1], batch.completion_ids[0])
    by_mask = batch.select(batch.group_ids == 1)
    assert by_mask.group_ids.tolist() == [1, 1]
    parts = batch.split(3)
    assert [len(p) for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p.logprobs for p in parts]), batch.logprobs)
    assert batch.to("cpu").texts == batch.texts
    # concat undoes split, and pads parts of different widths consistently.
    again = RolloutBatch.concat(parts, tokenizer.pad_token_id)
    assert all(
        torch.equal(getattr(again, f), getattr(batch, f)) for f in ("prompt_ids", "logprobs")
    )
    short = RolloutEngine(model, tokenizer).generate(
        ["a"], SamplingParams(max_new_tokens=2, seed=0)
    )
    mixed = RolloutBatch.concat([short, batch], tokenizer.pad_token_id)
    assert mixed.prompt_ids.shape[1] == batch.prompt_ids.shape[1] and len(mixed) == len(batch) + 1
    assert mixed.lengths.tolist() == short.lengths.tolist() + batch.lengths.tolist()
    assert torch.equal(mixed.prompt_ids[1:], batch.prompt_ids)


def test_stop_strings_cut_text_and_mask(model, tokenizer, prompts):
    engine = RolloutEngine(model, tokenizer)
    max_new = 24
    plain = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
    text = plain.texts[1]
    # A 2-character stop string from the middle of row 1's greedy text.
    start = next(i for i in range(6, len(text) - 2) if text[i : i + 2].isprintable())
    stop = text[start : start + 2]
    cut = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=max_new, stop=[stop])
    )

    end = text.find(stop) + len(stop)
    assert cut.texts[1] == text[:end] and cut.texts[1].endswith(stop)
    length = int(cut.lengths[1])
    tokens = plain.completion_ids[1, :length].tolist()
    assert cut.completion_ids[1, :length].tolist() == tokens
    # The mask ends at the token that completes the stop string, not one token later or earlier.
    assert stop in tokenizer.decode(tokens, skip_special_tokens=True)
    assert stop not in tokenizer.decode(tokens[:-1], skip_special_tokens=True)
    assert not cut.truncated[1] and cut.completion_mask[1, length:].sum() == 0
    for r in range(len(prompts)):  # rows without the stop string are unchanged
        if stop not in plain.texts[r]:
            assert cut.texts[r] == plain.texts[r] and bool(cut.truncated[r]) == bool(
                plain.truncated[r]
            )


class ForwardRecorder:
    """Records (batch, sequence length) of every top-level forward call, and model.training."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.training: list[bool] = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.shapes.append(tuple(kwargs["input_ids"].shape))
        self.training.append(module.training)


def test_prefill_once_and_finished_rows_leave_batch(model, tokenizer, prompts, extra_eos):
    extra_eos(model, tokenizer, many=True)
    engine = RolloutEngine(model, tokenizer)
    n, max_new = 4, 16
    recorder = ForwardRecorder(model)
    model.train()  # the engine must switch to eval and back
    batch = engine.generate(
        prompts, SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, seed=3)
    )
    recorder.handle.remove()
    assert model.training and not any(recorder.training)

    prompt_width = max(len(engine.encode(p)) for p in prompts)
    assert recorder.shapes[0] == (len(prompts), prompt_width)  # one prefill, not prompts * n
    decode = recorder.shapes[1:]
    assert all(width == 1 for _, width in decode)
    assert engine.last_stats["forward_passes"] == len(recorder.shapes)
    # Forward j feeds the token sampled at step j to the rows still running after it.
    lengths = batch.lengths
    expected = [int((lengths > j + 1).sum()) for j in range(int(lengths.max()) - 1)]
    assert [b for b, _ in decode] == expected
    assert expected[0] < len(prompts) * n or expected[-1] < expected[0], "no row finished early"


def test_prompt_forms_and_errors(model, tokenizer):
    engine = RolloutEngine(model, tokenizer)
    chat = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert engine.encode(chat) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert engine.encode(torch.tensor([3, 4])) == [3, 4]
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prompt_shared_decode_equals_copied_prompt_cache(
    model, tokenizer, prompts, extra_eos, temperature, monkeypatch
):
    """Decode attention that reads each prompt once per group (prefix_shared.py) gives the
    tokens and log-probs of the n-fold copied cache, rows finishing at mixed steps included."""
    import posttrain.rollout.engine as engine_module

    used = []

    class CountingSharedPrompt(engine_module.SharedPrompt):
        def __init__(self, *args):
            super().__init__(*args)
            used.append(self)

    monkeypatch.setattr(engine_module, "SharedPrompt", CountingSharedPrompt)
    extra_eos(model, tokenizer, many=True)
    params = SamplingParams(n=4, temperature=temperature, max_new_tokens=16, seed=5)
    copied = RolloutEngine(model, tokenizer, share_prompt=False).generate(prompts, params)
    assert not used
    shared = RolloutEngine(model, tokenizer, share_prompt=True).generate(prompts, params)
    assert used  # the shared path ran
    if temperature > 0:
        assert copied.lengths.min() < copied.lengths.max()  # rows left the batch early
    assert torch.equal(shared.completion_ids, copied.completion_ids)
    torch.testing.assert_close(shared.logprobs, copied.logprobs, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored after decoding
