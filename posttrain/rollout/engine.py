"""The rollout engine: n sampled completions per prompt from a Hugging Face causal LM.

Every online trainer and `posttrain eval` get samples here; nobody else calls
`model.generate`. Per chunk of at most `max_batch_prompts` prompts:

1. Prefill once. The prompts are left-padded into one (B, P) batch with an attention mask
   and position ids counted over real tokens, run through the model once into a
   `DynamicCache` whose full-attention layers write into preallocated buffers (cache.py),
   keeping only the last position's logits (`logits_to_keep=1`).
2. Expand to n sample rows per prompt (rows [g*n:(g+1)*n] are prompt g; the last logits are
   repeated), so the prompt is never recomputed n times. On sdpa models with plain
   full-attention layers the prompt's keys/values stay one copy per prompt and the decode
   attention reads them once per group (prefix_shared.py); otherwise
   `cache.batch_repeat_interleave(n)` copies them to the n rows (as nanochat's engine does).
3. Decode. One token per step for every active row (sampling.py). A row finishes on an EOS
   id (the tokenizer's and the generation config's) or when the decoded tail of its
   completion contains a stop string. Finished rows leave the batch at once: the cache,
   mask, positions and row map are indexed with the surviving rows
   (`cache.batch_select_indices`), so they cost no further compute.

With `SamplingParams(speculative="mtp")` and the model's MTP heads, a chunk is decoded by
self-speculation instead (speculative.py): the heads draft K tokens, one forward of the main
model verifies them, and the output is the main model's (same greedy tokens, same sampling
distribution, same log-probs). `speculative="auto"` does so only for chunks with fewer rows than
`speculative_break_even`, where it is faster, and decodes plainly otherwise (one notice).

Log-probs are those of the sampled tokens under softmax(logits / T) before top-k / top-p
(sampling.py), the quantity `sequence_logprobs` recomputes by teacher forcing.

Callers pass the unwrapped Hugging Face model (`accelerator.unwrap_model(model)`), not a
DDP/FSDP wrapper: generation needs no gradient synchronisation, and a DDP forward would try to
sync buffers between ranks that generate different numbers of steps.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from transformers import DynamicCache

from posttrain.models.sharding import full_parameters
from posttrain.rollout.cache import cached_last_logits, preallocated_cache
from posttrain.rollout.logprobs import accepts_logits_to_keep
from posttrain.rollout.prefix_shared import SharedPrompt, supports_shared_prompt
from posttrain.rollout.sampling import draw_uniforms, sample_next
from posttrain.rollout.speculative import (
    DEFAULT_BREAK_EVEN_ROWS,
    SpeculativeDecoder,
    use_speculation,
)
from posttrain.rollout.stopping import StopChecker, cut_at_stop
from posttrain.rollout.types import RolloutBatch, SamplingParams
from posttrain.utils import as_token_list, eos_ids, left_pad, position_ids_from_mask


class RolloutEngine:
    """Batched sampling with a shared-prefix KV cache.

    `last_stats` describes the last `generate` call: prompts, samples, prompt_tokens,
    generated_tokens (EOS / stop tokens included), forward_passes (1 prefill per chunk + decode
    steps), seconds and tokens_per_s (generated tokens per wall-clock second); with
    `speculative="mtp"` also accept_rate_k for k = 1..K (the fraction of row-steps, i.e. a row
    in a verify forward, that accepted at least k drafts) and tokens_per_forward (mean tokens a
    row gains per verify forward, 1 + sum of the rates).

    mtp_heads: the model's `MTPHeads` (posttrain.models.mtp.load_heads), needed for
    `SamplingParams(speculative="mtp")` (rollout/speculative.py).
    speculative_break_even: with `speculative="auto"`, chunks of at least this many rows
    (prompts x n) decode plainly (speculative.DEFAULT_BREAK_EVEN_ROWS, or a value from
    speculative.calibrate_break_even).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_prompts: int = 64,
        mtp_heads=None,
        share_prompt=True,
        speculative_break_even: int = DEFAULT_BREAK_EVEN_ROWS,
    ):
        if isinstance(model, DistributedDataParallel):
            raise TypeError(
                "RolloutEngine needs the unwrapped model: pass accelerator.unwrap_model(model)"
            )
        if max_batch_prompts < 1:
            raise ValueError(f"max_batch_prompts must be >= 1, got {max_batch_prompts}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_prompts = max_batch_prompts
        self.mtp_heads = mtp_heads
        # n > 1: decode attention reads each prompt's keys once per group (prefix_shared.py)
        self.share_prompt = share_prompt
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        self.last_stats: dict[str, float] = {}
        self.speculative_break_even = speculative_break_even
        self._noticed: set[str] = set()  # "auto" step-aside reasons already printed

    # ---- prompts -------------------------------------------------------------------------

    def encode(self, prompt) -> list[int]:
        """Token ids of one prompt: a chat (list of {role, content}) rendered with the chat
        template and the assistant generation prompt, a string tokenized as is (with the
        tokenizer's own special tokens, as `tokenizer(text)` does), or a list of token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            ids = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = prompt
        ids = as_token_list(ids)
        if not ids:
            raise ValueError("empty prompt: generation needs at least one token to condition on")
        return [int(i) for i in ids]

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self, prompts: list, params: SamplingParams, prompt_seeds: list[int] | None = None
    ) -> RolloutBatch:
        """Sample `params.n` completions for each prompt; rows are grouped by prompt.

        prompt_seeds: optional seed per prompt; prompt g's samples then depend on
        prompt_seeds[g] only (not on params.seed nor on the other prompts in the call), so
        sharding prompts over processes leaves every prompt's rollout unchanged.
        """
        if len(prompts) == 0:
            raise ValueError("generate() needs at least one prompt")
        if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
            raise ValueError(f"got {len(prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
        if params.speculative == "mtp" and self.mtp_heads is None:
            raise ValueError("speculative='mtp' needs RolloutEngine(..., mtp_heads=heads)")
        encoded = [self.encode(p) for p in prompts]
        device = next(self.model.parameters()).device
        uniforms = None  # (N, M) random numbers driving every draw; greedy needs none
        if params.temperature > 0:
            uniforms = draw_uniforms(
                len(prompts), params.n, params.max_new_tokens, params.seed, prompt_seeds, device
            )
        self._forwards = 0
        speculative, speculated = None, 0
        if params.speculative != "none" and self.mtp_heads is not None:
            speculative = SpeculativeDecoder(
                self.model, self.tokenizer, self.mtp_heads, self.pad_id
            )
        self._head_kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            # A sharded policy (FSDP2/ZeRO-3) is gathered once, outside inference mode (FSDP2's
            # unsharded parameters must stay ordinary tensors that training can update later);
            # the decode loop then runs a different number of forwards on each rank with no
            # collectives inside. A replicated model passes through untouched.
            with full_parameters(self.model), torch.inference_mode():
                chunks = []
                for start in range(0, len(encoded), self.max_batch_prompts):
                    stop = start + self.max_batch_prompts
                    rows = slice(start * params.n, stop * params.n)
                    chunk_uniforms = None if uniforms is None else uniforms[rows]
                    prompts_here = encoded[start:stop]
                    generate_chunk = self._generate_chunk
                    speculate, reason = use_speculation(
                        params.speculative,
                        len(prompts_here) * params.n,
                        self.speculative_break_even,
                        speculative is not None,
                    )
                    if speculate:
                        generate_chunk, speculated = speculative.generate_chunk, speculated + 1
                    elif reason and reason not in self._noticed:
                        self._noticed.add(reason)
                        print(f"note: speculative=auto decodes plainly: {reason}", flush=True)
                    chunks.append(generate_chunk(prompts_here, params, chunk_uniforms, device))
        finally:
            self.model.train(was_training)
        # Assembled outside inference mode, so trainers can use these tensors with autograd.
        batch = self._assemble(encoded, chunks, params, device)
        seconds = time.perf_counter() - started
        generated = int(batch.completion_mask.sum())
        self.last_stats = {
            "prompts": len(prompts),
            "samples": len(batch),
            "prompt_tokens": sum(len(ids) for ids in encoded),
            "generated_tokens": generated,
            "forward_passes": self._forwards
            + (speculative.stats.forward_passes if speculative is not None else 0),
            "seconds": seconds,
            "tokens_per_s": generated / max(seconds, 1e-9),
        }
        self.last_stats["speculative_chunks"] = speculated
        if speculated:
            rates = speculative.stats.accept_rates()
            self.last_stats.update({f"accept_rate_{k + 1}": r for k, r in enumerate(rates)})
            # a row gains 1 + (accepted drafts) tokens per verify forward
            self.last_stats["tokens_per_forward"] = 1 + sum(rates)
        return batch

    def _forward(
        self, cache: DynamicCache, input_ids: Tensor, attention_mask: Tensor, positions: Tensor
    ) -> Tensor:
        """One cached forward; returns the last position's logits (B, V) in float32."""
        self._forwards += 1
        return cached_last_logits(
            self.model, cache, input_ids, attention_mask, positions, self._head_kwargs
        )

    def _generate_chunk(
        self, encoded: list[list[int]], params: SamplingParams, uniforms: Tensor | None, device
    ):
        """Sample n completions for each of B prompts. Returns, for R = B*n rows: tokens (R, M),
        logprobs (R, M), lengths (R,), stopped (R,) with M = max_new_tokens."""
        n, max_new = params.n, params.max_new_tokens
        prompt_ids, prompt_mask = left_pad(encoded, self.pad_id, device)  # (B, P)
        width = prompt_ids.shape[1]  # P

        # 1. Prefill once per prompt; keep the last position's logits (B, V).
        cache = preallocated_cache(self.model.config, capacity=width + max_new)
        logits = self._forward(cache, prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask))

        # 2. Expand to n rows per prompt: rows [g*n:(g+1)*n] share prompt g's keys/values,
        # read once per group by the decode attention (prefix_shared.py) where the model
        # allows, else copied n-fold.
        shared = None
        if n > 1:
            if self.share_prompt and supports_shared_prompt(self.model, cache):
                shared = SharedPrompt(cache, prompt_mask, n)
                cache = preallocated_cache(self.model.config, capacity=max_new, offset=width)
            else:
                cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)  # (R, V)
            prompt_mask = prompt_mask.repeat_interleave(n, dim=0)  # (R, P)
        decoding = partial(shared.active, self.model) if shared is not None else nullcontext
        rows = logits.shape[0]  # R
        # The mask for every step is a prefix of this one; slicing avoids a concat per step.
        ones = prompt_mask.new_ones(rows, max_new)
        full_mask = torch.cat([prompt_mask, ones], dim=1)  # (R, P + M)
        positions = prompt_mask.sum(dim=1)  # (R,) position of the next token = real prompt length

        tokens = torch.full((rows, max_new), self.pad_id, dtype=torch.long, device=device)  # (R, M)
        logprobs = torch.zeros((rows, max_new), dtype=torch.float32, device=device)  # (R, M)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        active = torch.arange(rows, device=device)  # chunk row of each row still in the batch
        eos = torch.tensor(eos_ids(self.model, self.tokenizer), dtype=torch.long, device=device)
        stop_checker = StopChecker(self.tokenizer, params.stop, rows) if params.stop else None

        # 3. Decode.
        for step in range(max_new):
            step_uniforms = None if uniforms is None else uniforms[active, step]  # (A,)
            next_tokens, next_logprobs = sample_next(logits, params, step_uniforms)  # (A,), (A,)
            tokens[active, step] = next_tokens
            logprobs[active, step] = next_logprobs
            lengths[active] = step + 1
            done = torch.isin(next_tokens, eos)  # (A,)
            if stop_checker is not None:
                done |= stop_checker.update(active, next_tokens, done).to(device)
            stopped[active] = done
            if step + 1 == max_new:
                break
            if done.any():
                keep = (~done).nonzero().squeeze(-1)  # (A',)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                if shared is not None:
                    shared.select(keep)
                active, next_tokens = active[keep], next_tokens[keep]
                full_mask, positions = full_mask[keep], positions[keep]
            with decoding():
                logits = self._forward(
                    cache,
                    next_tokens.unsqueeze(-1),
                    full_mask[:, : width + step + 1],
                    positions.unsqueeze(-1),
                )
            positions = positions + 1
        return tokens, logprobs, lengths, stopped

    def _assemble(self, encoded, chunks, params: SamplingParams, device) -> RolloutBatch:
        n = params.n
        tokens = torch.cat([c[0] for c in chunks])  # (N, M)
        logprobs = torch.cat([c[1] for c in chunks])
        lengths = torch.cat([c[2] for c in chunks])  # (N,)
        stopped = torch.cat([c[3] for c in chunks])
        completion_width = int(lengths.max())  # C
        completion_mask = (
            torch.arange(completion_width, device=device) < lengths.unsqueeze(1)
        ).long()
        completion_ids = tokens[:, :completion_width].clone()
        logprobs = logprobs[:, :completion_width].clone()

        prompt_ids, prompt_mask = left_pad(encoded, self.pad_id, device)  # (num_prompts, P)

        ids_per_row = completion_ids.tolist()
        texts = self.tokenizer.batch_decode(
            [row[:length] for row, length in zip(ids_per_row, lengths.tolist(), strict=True)],
            skip_special_tokens=True,
        )
        if params.stop:
            texts = [cut_at_stop(text, params.stop) for text in texts]
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logprobs,
            truncated=~stopped,
            group_ids=torch.arange(len(encoded), device=device).repeat_interleave(n),
            texts=texts,
        )
