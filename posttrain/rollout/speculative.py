"""Self-speculative decoding with MTP heads (spec section 11), for `RolloutEngine`.

Per step, every active row holds t_n (the main model's latest token, not yet fed) and K drafts
d_1..d_K from the heads. One cached forward of the main model over [t_n, d_1..d_K] (S = K + 1
slots) gives its distributions at positions n..n+K; a row accepts a prefix of a drafts and
appends the main model's next token c after it (a correction, or the bonus token when all K
are accepted), so a forward yields a + 1 tokens.

- Greedy: accept the longest prefix equal to the main model's argmax; c is that argmax, so the
  tokens are the ones plain greedy decoding picks (up to float rounding of a wider forward).
- Sampling: Leviathan et al. 2023 / Chen et al. 2023: accept d_j with probability
  min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw c from normalise(max(0, p_j - q_j)),
  after K acceptances from p_K. p and q are the same temperature / top-k / top-p filtered
  distributions plain sampling uses, so every token follows the main model's distribution.
  (The rule is `posttrain.losses.mtp.speculative_accept_rows`.)

Rows accept different counts. The KV cache keeps one common length: all S slots of a step are
written, and the slots of rejected drafts become holes, masked out of every later attention by
the 2-D key mask (position ids are explicit, so holes shift nothing). A DeepSeek module's own
cache follows the same slots. Deviation: module k >= 2 computes its entry at the newest position
from drafted tokens; if those are rejected later, that entry stays stale. It only lowers the
acceptance of later drafts, never changes an output token.

`speculative="auto"` (`use_speculation`): a verify forward costs about (K+1) decode forwards of
compute, so speculation wins while decoding is bound by per-forward overhead and weight reads
(few rows) and loses once the forward is compute-bound (many rows). Below a break-even number
of rows per chunk (`DEFAULT_BREAK_EVEN_ROWS`, or the engine's `speculative_break_even`, e.g.
from `calibrate_break_even` on the machine at hand) the engine speculates; at or above it, or
without MTP heads, it decodes plainly after a one-line notice. Both paths emit the same greedy
tokens, so "auto" only ever changes the speed.

Randomness: one generator per chunk, seeded from the engine's pre-drawn uniforms, so a seeded
run is reproducible, but a prompt's samples depend on the prompts sharing its chunk. Log-probs
are the main model's log softmax(logits / T) at each emitted token, as without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from posttrain.losses.mtp import greedy_accept_rows, speculative_accept_rows
from posttrain.models.mtp import KVBuffer, MTPHeads, capture_lm_head_input
from posttrain.rollout.cache import preallocated_cache
from posttrain.rollout.logprobs import accepts_logits_to_keep
from posttrain.rollout.sampling import filter_logits
from posttrain.rollout.stopping import StopChecker
from posttrain.rollout.types import SamplingParams
from posttrain.utils import eos_ids, left_pad, position_ids_from_mask

# Rows (prompts x samples) of a chunk from which "auto" decodes plainly. Measured with
# bench/speculative_bench.py (small preset, MTP depth 3, 2 CPU threads, greedy, 48 new tokens):
# speculative / plain = 2.02x at 1 row, 1.26x at 16, 0.98x at 64; 32 keeps a margin below the
# crossing. Another machine or model moves it: pass `speculative_break_even` to the engine.
DEFAULT_BREAK_EVEN_ROWS = 32


def use_speculation(mode: str, rows: int, break_even: int, has_heads: bool) -> tuple[bool, str]:
    """Whether a chunk of `rows` decoding rows speculates, and why not when it does not.
    mode: "none" | "mtp" | "auto"; "mtp" always speculates (the engine checks the heads)."""
    if mode == "none":
        return False, ""
    if mode == "mtp":
        return True, ""
    if not has_heads:
        return False, "no MTP heads were given to the engine"
    if rows >= break_even:
        return False, f"{rows} rows per chunk >= the break-even of {break_even}"
    return True, ""


def calibrate_break_even(
    engine, prompts: list, max_new_tokens: int = 32, batches=(1, 4, 16, 64)
) -> int:
    """The smallest batch (rows) in `batches` at which greedy speculation is not faster than
    plain decoding on this machine (one timed call each, after a warm-up), or twice the largest
    batch when it always wins. `prompts` must hold at least max(batches) prompts."""
    import time

    def seconds(params, chunk) -> float:
        started = time.perf_counter()
        engine.generate(chunk, params)
        return time.perf_counter() - started

    plain = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    spec = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, speculative="mtp")
    seconds(plain, prompts[:1]), seconds(spec, prompts[:1])  # warm-up
    for batch in batches:
        chunk = prompts[:batch]
        if seconds(spec, chunk) >= seconds(plain, chunk):
            return batch
    return 2 * max(batches)


@dataclass
class SpeculativeStats:
    """What a `SpeculativeDecoder` did: main-model forwards (prefills and verifies), row-steps
    (a row in a verify forward) and, per draft depth k, row-steps that accepted at least k+1."""

    forward_passes: int = 0
    row_steps: int = 0
    accepted: list[int] = field(default_factory=list)

    def accept_rates(self) -> list[float]:
        """accept_rate_k for k = 1..K: the fraction of row-steps accepting at least k drafts."""
        steps = max(self.row_steps, 1)
        return [count / steps for count in self.accepted]


class SpeculativeDecoder:
    """Self-speculative decoding of prompt chunks with a model's MTP heads; `RolloutEngine`
    makes one per `generate` call and reads its `stats` afterwards."""

    def __init__(self, model, tokenizer, heads: MTPHeads, pad_id: int):
        self.model, self.tokenizer, self.heads, self.pad_id = model, tokenizer, heads, pad_id
        self.head_kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self.stats = SpeculativeStats(accepted=[0] * heads.depth)

    def generate_chunk(self, encoded, params: SamplingParams, uniforms, device):
        """Like `RolloutEngine._generate_chunk`: tokens (R, M), logprobs (R, M), lengths (R,),
        stopped (R,)."""
        return generate_chunk_speculative(self, encoded, params, uniforms, device)


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The filtered distribution plain sampling draws from. logits: (..., V) float32."""
    shape = logits.shape
    scaled = logits.reshape(-1, shape[-1]) / params.temperature
    return filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1).view(shape)


def pick(logits: Tensor, params: SamplingParams, generator) -> tuple[Tensor, Tensor | None]:
    """One token per row from (A, V) logits: argmax, or a draw from `target_probs`. Returns the
    tokens (A,) and, when sampling, the distribution they were drawn from (A, V)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1), None
    probs = target_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs


def accept(
    logits: Tensor, drafts: Tensor, draft_probs: Tensor | None, params: SamplingParams, generator
) -> tuple[Tensor, Tensor]:
    """logits: (A, K+1, V) of the main model at t_n, d_1..d_K; drafts: (A, K); draft_probs q:
    (A, K, V) or None when greedy. Returns accepted counts a (A,) and next tokens c (A,), by the
    acceptance rules of posttrain.losses.mtp (greedy prefix match / Leviathan et al.)."""
    if params.temperature == 0:
        return greedy_accept_rows(drafts, logits.argmax(dim=-1))
    return speculative_accept_rows(drafts, draft_probs, target_probs(logits, params), generator)


class Drafter:
    """Drafts K tokens per row from the main model's hidden states at the newest slots."""

    def __init__(self, heads: MTPHeads, model, params: SamplingParams, generator):
        self.heads, self.params, self.generator = heads, params, generator
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.kv = [KVBuffer() for _ in range(heads.depth)] if heads.kind == "deepseek" else []

    def select(self, keep: Tensor) -> None:
        for buffer in self.kv:
            buffer.select(keep)

    def draft(
        self, hidden: Tensor, stream: Tensor, last: Tensor, positions: Tensor, key_mask: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """hidden h^0: (A, S, H) at the S newest slots; stream: (A, S+K+1) tokens, stream[:, j]
        at slot j's position (j < S: the fed token), stream[:, last+1] = c; last: (A,) slot of
        the newest accepted position; positions: (A, S); key_mask: (A, L) valid slots, these S
        included. Returns drafts (A, K) and their distributions (A, K, V) (None if greedy)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        drafts, probs = [], []
        if self.heads.kind == "medusa":
            newest = hidden[rows, last]  # (A, H)
            for k in range(self.heads.depth):
                logits = self.lm_head(self.heads.medusa_hidden(k, newest)).float()
                token, dist = pick(logits, self.params, self.generator)
                drafts.append(token)
                probs.append(dist)
        else:
            width, total = hidden.shape[1], key_mask.shape[1]
            # query slot s sees valid keys up to its own slot, and always itself
            causal = torch.ones(width, total, dtype=torch.bool, device=hidden.device)
            causal = causal.tril(diagonal=total - width)
            diagonal = torch.zeros_like(causal)
            diagonal[:, total - width :] = torch.eye(width, dtype=torch.bool, device=hidden.device)
            mask = ((key_mask.bool().unsqueeze(1) & causal) | diagonal).unsqueeze(1)  # (A,1,S,L)
            prev = hidden
            for k, module in enumerate(self.heads.modules_k):
                tokens = stream[:, k + 1 : k + 1 + width]  # (A, S) t_{i+k+1}
                prev = module(prev, self.embed(tokens), positions, mask, self.kv[k])
                logits = self.lm_head(module.out_norm(prev[rows, last])).float()  # (A, V)
                token, dist = pick(logits, self.params, self.generator)
                stream[rows, last + k + 2] = token  # the next module reads it as t_{i+k+2}
                drafts.append(token)
                probs.append(dist)
        stacked = None if probs[0] is None else torch.stack(probs, dim=1)
        return torch.stack(drafts, dim=1), stacked


def _forward(decoder, cache, ids, mask, positions, all_logits: bool) -> tuple[Tensor, Tensor]:
    """Cached main-model forward; returns logits (A, S', V) float32 and h^0 (A, S', H), with
    S' = S, or 1 (the last slot) unless all_logits."""
    decoder.stats.forward_passes += 1
    extra = {} if all_logits else decoder.head_kwargs
    with capture_lm_head_input(decoder.model) as captured:
        out = decoder.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
    return out.logits.float(), captured.hidden


def generate_chunk_speculative(
    decoder: SpeculativeDecoder,
    encoded: list[list[int]],
    params: SamplingParams,
    uniforms: Tensor | None,
    device,
):
    """`SpeculativeDecoder.generate_chunk`; adds forwards and acceptance counts to
    `decoder.stats`."""
    heads: MTPHeads = decoder.heads
    n, max_new, depth = params.n, params.max_new_tokens, heads.depth
    generator = None
    if uniforms is not None:
        generator = torch.Generator(device=device).manual_seed(int(uniforms[0, 0] * 2**62))
    drafter = Drafter(heads, decoder.model, params, generator)
    prompt_ids, prompt_mask = left_pad(encoded, decoder.pad_id, device)  # (B, P)
    width = prompt_ids.shape[1]

    # Prefill; a DeepSeek drafter needs h^0 at every prompt slot, Medusa only at the last.
    cache = preallocated_cache(decoder.model.config, capacity=width + max_new * (depth + 1))
    prompt_positions = position_ids_from_mask(prompt_mask)
    logits, hidden = _forward(
        decoder, cache, prompt_ids, prompt_mask, prompt_positions, heads.kind == "deepseek"
    )
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, hidden = logits.repeat_interleave(n, 0), hidden.repeat_interleave(n, 0)
        prompt_ids = prompt_ids.repeat_interleave(n, 0)
        prompt_mask = prompt_mask.repeat_interleave(n, 0)
        prompt_positions = prompt_positions.repeat_interleave(n, 0)
    rows = logits.shape[0]  # R
    scale = params.temperature if params.temperature > 0 else 1.0
    first, _ = pick(logits[:, -1], params, generator)  # (R,) t_P

    tokens = torch.full((rows, max_new), decoder.pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new), dtype=torch.float32, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)
    eos = torch.tensor(eos_ids(decoder.model, decoder.tokenizer), dtype=torch.long, device=device)
    stop_checker = StopChecker(decoder.tokenizer, params.stop, rows) if params.stop else None
    stats = decoder.stats

    def emit(new: Tensor, new_logp: Tensor, count: Tensor) -> Tensor:
        """Append the first count[r] of new[r] (A, S) to each active row, cut at EOS, stop
        strings and max_new_tokens. Returns done (A,)."""
        count = torch.minimum(count, max_new - lengths[active])
        hit_eos = torch.isin(new, eos) & (
            torch.arange(new.shape[1], device=device) < count[:, None]
        )
        first_eos = torch.where(hit_eos.any(1), hit_eos.int().argmax(1) + 1, count)
        done = hit_eos.any(1)
        count = first_eos
        if stop_checker is not None:
            alive = torch.ones_like(done)
            for j in range(int(count.max())):
                sel = ((j < count) & alive).nonzero().squeeze(-1)
                hit = stop_checker.update(active[sel], new[sel, j], hit_eos[sel, j]).to(device)
                count[sel[hit]] = j + 1
                done[sel[hit]] = True
                alive[sel[hit]] = False
        for j in range(int(count.max())):
            sel = (j < count).nonzero().squeeze(-1)
            tokens[active[sel], lengths[active[sel]] + j] = new[sel, j]
            logprobs[active[sel], lengths[active[sel]] + j] = new_logp[sel, j]
        lengths[active] += count
        stopped[active] = done
        return done | (lengths[active] >= max_new)

    first_logp = (logits[:, -1] / scale).log_softmax(-1).gather(-1, first[:, None])  # (R, 1)
    done = emit(first[:, None], first_logp, torch.ones_like(first))
    stream = torch.cat([prompt_ids, first[:, None], prompt_ids.new_zeros(rows, depth)], dim=1)
    key_mask = prompt_mask  # (R, L) 1 on slots later tokens may attend to
    # the newest prompt slot in `hidden` (Medusa's prefill keeps only that one)
    last = torch.full((rows,), hidden.shape[1] - 1, dtype=torch.long, device=device)
    positions = prompt_mask.sum(dim=1)  # (R,) position of t_n
    next_token, slot_positions = first, prompt_positions
    steps = torch.arange(depth + 1, device=device)
    while True:
        if done.any():
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            drafter.select(keep)
            active, next_token, positions, key_mask = (
                active[keep],
                next_token[keep],
                positions[keep],
                key_mask[keep],
            )
            hidden, stream, last, slot_positions = (
                hidden[keep],
                stream[keep],
                last[keep],
                slot_positions[keep],
            )
        drafts, draft_probs = drafter.draft(hidden, stream, last, slot_positions, key_mask)

        # Verify t_n, d_1..d_K in one forward; all K+1 slots are written to the cache.
        fed = torch.cat([next_token[:, None], drafts], dim=1)  # (A, S)
        slot_positions = positions[:, None] + steps  # (A, S)
        fed_mask = torch.cat([key_mask, key_mask.new_ones(fed.shape)], dim=1)
        logits, hidden = _forward(decoder, cache, fed, fed_mask, slot_positions, True)
        accepted, correction = accept(logits, drafts, draft_probs, params, generator)
        stats.row_steps += len(accepted)
        for k in range(depth):
            stats.accepted[k] += int((accepted > k).sum())

        # Emit d_1..d_a then c, with the main model's log-probs of each.
        rows_a = torch.arange(len(accepted), device=device)
        new = torch.cat([drafts, drafts.new_zeros(len(accepted), 1)], dim=1)
        new[rows_a, accepted] = correction
        new_logp = (logits / scale).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        done = emit(new, new_logp, accepted + 1)

        # Rejected slots become holes; the next step starts after the correction.
        key_mask = torch.cat([key_mask, (steps <= accepted[:, None]).long()], dim=1)
        stream = torch.cat([fed, fed.new_zeros(len(accepted), depth + 1)], dim=1)  # (A, S+K+1)
        stream[rows_a, accepted + 1] = correction
        last, positions, next_token = accepted, positions + accepted + 1, correction
    return tokens, logprobs, lengths, stopped
