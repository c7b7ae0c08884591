"""Choosing the next token from last-position logits: greedy, temperature, top-k, top-p.

The filters follow the order of Hugging Face's logits warpers (temperature, then top-k, then
top-p on the top-k-renormalised distribution), so a seeded run is a faithful reference for
users who know `model.generate`.

Randomness is drawn up front, one uniform per (row, step), and a token is chosen by inverting
the filtered CDF at that uniform: exact sampling from the filtered distribution, with streams
that can be tied to each prompt (`prompt_seeds`) instead of to the batch.

The returned log-prob is that of the UNFILTERED tempered distribution, log softmax(logits / T)
(T = 1 when greedy). That is the quantity the teacher-forced recomputation in `logprobs.py`
gives back (spec section 12), so π_old from sampling and from a forward pass agree; top-k and
top-p only decide which tokens can be drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.rollout.types import SamplingParams


def filter_logits(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf. scaled: (B, V) already divided by T."""
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Probability mass strictly before each token: drop a token once the tokens ahead of it
        # already reach top_p. The most likely token always stays (its mass before is 0).
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_next(
    logits: Tensor, params: SamplingParams, uniforms: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Pick one token per row. logits: (B, V) float32; uniforms: (B,) in [0, 1), one per row
    (unused when greedy). Returns tokens (B,) long and their log-probs (B,) float32 under
    softmax(logits / T).

    Sampling inverts the CDF at the row's uniform, so each row's draw is a function of its own
    pre-drawn random number only: rows do not share a random stream, and a prompt's samples do
    not depend on which other prompts are in the batch (see `draw_uniforms`).
    """
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)  # (B,)
        logprobs = logits.log_softmax(dim=-1)
    else:
        scaled = logits / params.temperature  # (B, V)
        logprobs = scaled.log_softmax(dim=-1)
        probs = filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)  # (B, V)
        cdf = probs.cumsum(dim=-1)  # (B, V)
        target = uniforms.unsqueeze(-1) * cdf[:, -1:]  # (B, 1)
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (B,)
        # Rounding can put the target at the very top of the CDF: take the last token that has
        # probability, never a filtered-out one.
        vocab_index = torch.arange(probs.shape[-1], device=probs.device)
        last_allowed = torch.where(probs > 0, vocab_index, -1).amax(dim=-1)  # (B,)
        tokens = torch.minimum(tokens, last_allowed)
    picked = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B,)
    return tokens, picked.float()


def draw_uniforms(
    num_prompts: int,
    n: int,
    max_new_tokens: int,
    seed: int | None,
    prompt_seeds: list[int] | None,
    device: torch.device,
) -> Tensor:
    """(num_prompts * n, max_new_tokens) uniforms in [0, 1): entry [r, t] drives row r's draw at
    step t.

    With `prompt_seeds`, prompt g's n rows come from a generator seeded with prompt_seeds[g]
    alone, so a prompt samples the same completions whichever other prompts share the call or
    the process (data-parallel sharding and chunking do not change a rollout, up to float
    rounding of differently shaped batches). Otherwise one generator seeded with `seed` draws
    all rows; with no seed either, that seed comes from torch's global RNG, so
    `torch.manual_seed` still makes a run reproducible.
    """
    shape = (n, max_new_tokens)
    if prompt_seeds is not None:
        if len(prompt_seeds) != num_prompts:
            raise ValueError(f"got {len(prompt_seeds)} prompt_seeds for {num_prompts} prompts")
        blocks = []
        for prompt_seed in prompt_seeds:
            generator = torch.Generator(device=device).manual_seed(int(prompt_seed) % 2**63)
            blocks.append(torch.rand(shape, generator=generator, device=device))
        return torch.cat(blocks)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device).manual_seed(int(seed) % 2**63)
    return torch.rand((num_prompts * n, max_new_tokens), generator=generator, device=device)
