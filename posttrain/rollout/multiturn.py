"""Multi-turn rollouts: the policy samples a turn, an environment answers, the policy goes on.

Token in, token out: the driver sees only token ids. Each row has a session (envs/session.py
makes them from an `Environment` and the chat template) with

    session.prompt_ids                      # the opening conversation, ready for generation
    session.step(turn_ids, eos) -> ids|None # the environment's reply as token ids to append
                                            # (tool message + the next generation prompt), or
                                            # None when the episode is over

Per chunk of rows:
1. Prefill every row's prompt once into a preallocated KV cache (cache.py). Rows are not
   expanded from a shared prompt as in engine.py: each row has its own environment instance,
   whose `reset` may differ between the samples of a group.
2. Decode a turn: every row still in its turn samples one token per step (sampling.py, the
   engine's sampler and log-probs); a row whose turn ended (EOS, or `max_new_tokens` tokens in
   this turn) feeds a pad token with attention-mask 0 until the slowest row ends, so the cache
   stays one rectangle and the hole is invisible to later tokens.
3. Ask each row's session for the environment's reply. Rows whose episode is over (or that hit
   `max_turns`, or a turn without EOS) leave the batch (`batch_select_indices`). The others
   APPEND [their last sampled token, if not fed yet] + [the reply's tokens] to the cache in one
   forward, left-padded to a common width with mask-0 holes, with positions counted over real
   tokens: nothing already in the cache is recomputed. Then back to 2.

`reuse_cache=False` re-prefills every continuing row's whole conversation at each turn instead
of appending: the plain path, which the KV continuation must match (tests/test_multiturn.py:
same tokens and log-probs, greedy and seeded).

Random numbers: row r's k-th sampled token (counted over all its turns) reads uniform [r, k]
of `draw_uniforms(..., max_turns * max_new_tokens, ...)`, so a row's samples do not depend on
the other rows, on chunking or on how the cache was built.

The result is a `RolloutBatch` whose completion is the whole conversation after the prompt:
sampled turns and environment replies, in order. `completion_mask` is 1 on all of them (they
are all attended to when log-probs are recomputed), `env_mask` is 1 on the environment's tokens
(and `sampled_mask` = completion_mask - env_mask is what carries loss, log-probs and KL);
`logprobs` are the sampling log-probs, 0 on environment tokens; `texts` are the last sampled
turn of each row (what reward functions score); `truncated` marks rows whose last turn hit
max_new_tokens without EOS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.models.sharding import full_parameters
from posttrain.rollout.cache import cached_last_logits, preallocated_cache
from posttrain.rollout.logprobs import accepts_logits_to_keep
from posttrain.rollout.sampling import draw_uniforms, sample_next
from posttrain.rollout.types import RolloutBatch, SamplingParams
from posttrain.utils import eos_ids, left_pad, position_ids_from_mask


class _Rows:
    """Per-row Python state of a multi-turn rollout (lists: rows grow by different amounts)."""

    def __init__(self, count: int):
        self.completion: list[list[int]] = [[] for _ in range(count)]
        self.from_env: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[float]] = [[] for _ in range(count)]
        self.last_turn: list[list[int]] = [[] for _ in range(count)]
        self.truncated = [False] * count
        self.turns = [0] * count
        self.num_sampled = [0] * count  # k of the next uniform [r, k]
        self.cut_off = 0  # episodes the environment wanted to continue past max_turns

    def sampled(self, row: int, token: int, logprob: float) -> None:
        self.completion[row].append(token)
        self.from_env[row].append(0)
        self.logprobs[row].append(logprob)
        self.num_sampled[row] += 1

    def environment(self, row: int, tokens: list[int]) -> None:
        self.completion[row].extend(tokens)
        self.from_env[row].extend([1] * len(tokens))
        self.logprobs[row].extend([0.0] * len(tokens))


class MultiTurnDriver:
    """Runs sessions to the end of their episodes with one policy; see the module docstring."""

    def __init__(self, engine, params: SamplingParams, max_turns: int, reuse_cache: bool = True):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if params.stop or params.speculative != "none":
            raise ValueError("multi-turn rollouts end a turn at EOS only (no stop strings, no MTP)")
        self.engine, self.model, self.params = engine, engine.model, params
        self.max_turns, self.reuse_cache = max_turns, reuse_cache
        self.pad_id = engine.pad_id
        self.eos = set(eos_ids(self.model, engine.tokenizer))
        self.forward_passes = 0
        self._head_kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
        self.cut_off = 0  # episodes of the last generate() still going at max_turns

    def _forward(self, cache, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """One cached forward; the last position's logits (A, V) in float32."""
        self.forward_passes += 1
        return cached_last_logits(self.model, cache, ids, mask, positions, self._head_kwargs)

    def generate(self, sessions: list, prompt_seeds: list[int] | None = None) -> RolloutBatch:
        """Roll out every session (rows [g*n:(g+1)*n] are group g; prompt_seeds: one per group)."""
        params, n = self.params, self.params.n
        if not sessions or len(sessions) % n:
            raise ValueError(f"got {len(sessions)} sessions for groups of n={n}")
        device = next(self.model.parameters()).device
        uniforms = None
        if params.temperature > 0:
            width = params.max_new_tokens * self.max_turns
            uniforms = draw_uniforms(
                len(sessions) // n, n, width, params.seed, prompt_seeds, device
            )
        state = _Rows(len(sessions))
        chunk = self.engine.max_batch_prompts * n
        was_training = self.model.training
        self.model.eval()
        try:
            with full_parameters(self.model), torch.inference_mode():
                for start in range(0, len(sessions), chunk):
                    rows = list(range(start, min(start + chunk, len(sessions))))
                    self._run(rows, sessions, state, uniforms, device)
        finally:
            self.model.train(was_training)
        self.cut_off = state.cut_off
        return self._assemble(sessions, state, device)

    def _prefill(self, sequences: list[list[int]], capacity: int, device):
        ids, mask = left_pad(sequences, self.pad_id, device)  # (A, T)
        cache = preallocated_cache(self.model.config, capacity=ids.shape[1] + capacity)
        logits = self._forward(cache, ids, mask, position_ids_from_mask(mask))
        return cache, logits, mask, mask.sum(dim=1)

    def _run(self, rows: list[int], sessions, state: _Rows, uniforms, device) -> None:
        params = self.params
        room = params.max_new_tokens * self.max_turns + 64 * self.max_turns
        prompts = [list(sessions[r].prompt_ids) for r in rows]
        cache, logits, full_mask, positions = self._prefill(prompts, room, device)
        active = list(rows)  # global row of each batch row
        for turn in range(self.max_turns):
            unfed = self._decode_turn(cache, logits, full_mask, positions, active, state, uniforms)
            logits, full_mask, positions = unfed["logits"], unfed["mask"], unfed["positions"]
            keep, blocks = [], []
            for i, r in enumerate(active):
                turn_ids = state.last_turn[r]
                state.turns[r] += 1
                eos = bool(turn_ids) and turn_ids[-1] in self.eos
                state.truncated[r] = not eos
                reply = sessions[r].step(list(turn_ids), eos)
                if reply is None or not eos:
                    continue
                if turn + 1 == self.max_turns:
                    state.cut_off += 1
                    continue
                state.environment(r, list(reply))
                keep.append(i)
                blocks.append(unfed["pending"][i] + list(reply))
            if not keep:
                return
            index = torch.tensor(keep, device=device)
            active = [active[i] for i in keep]
            if self.reuse_cache:
                cache.batch_select_indices(index)
                logits, full_mask, positions = logits[index], full_mask[index], positions[index]
                if not any(blocks):  # nothing to append: every row goes on from its logits
                    continue
                block_ids, block_mask = left_pad(blocks, self.pad_id, device)  # (A, W)
                block_positions = positions[:, None] + position_ids_from_mask(block_mask)
                full_mask = torch.cat([full_mask, block_mask], dim=1)
                fresh = self._forward(cache, block_ids, full_mask, block_positions)
                real = block_mask.sum(dim=1) > 0  # an empty reply after a fed EOS keeps its logits
                logits = torch.where(real[:, None], fresh, logits)
                positions = positions + block_mask.sum(dim=1)
            else:  # the plain path: the whole conversation again
                conversations = [prompts[rows.index(r)] + state.completion[r] for r in active]
                cache, logits, full_mask, positions = self._prefill(conversations, room, device)

    def _decode_turn(self, cache, logits, full_mask, positions, active, state, uniforms) -> dict:
        """Sample one turn for every batch row; returns the updated cache tensors and, per row,
        its `pending` tokens (sampled but not yet fed to the cache)."""
        params, device = self.params, logits.device
        count = len(active)
        live = torch.ones(count, dtype=torch.bool, device=device)
        pending: list[list[int]] = [[] for _ in range(count)]
        for r in active:
            state.last_turn[r] = []
        for step in range(params.max_new_tokens):
            idx = live.nonzero().squeeze(-1)  # (L,) batch rows sampling this step
            rows = [active[i] for i in idx.tolist()]
            step_uniforms = None
            if uniforms is not None:
                columns = torch.tensor([state.num_sampled[r] for r in rows])
                step_uniforms = uniforms[torch.tensor(rows), columns]
            tokens, logprobs = sample_next(logits[idx], params, step_uniforms)  # (L,), (L,)
            ended = []
            for i, r, token, logprob in zip(idx.tolist(), rows, tokens.tolist(), logprobs.tolist()):
                state.sampled(r, token, logprob)
                state.last_turn[r].append(token)
                pending[i] = [token]
                ended.append(token in self.eos or step + 1 == params.max_new_tokens)
            live[idx[torch.tensor(ended, dtype=torch.bool, device=device)]] = False
            if not live.any():
                break
            # Rows that sampled feed their token; rows whose turn ended earlier feed a hole.
            feed = torch.full((count, 1), self.pad_id, dtype=torch.long, device=device)
            feed_mask = torch.zeros((count, 1), dtype=torch.long, device=device)
            feed[idx, 0], feed_mask[idx, 0] = tokens, 1
            full_mask = torch.cat([full_mask, feed_mask], dim=1)
            fresh = self._forward(cache, feed, full_mask, positions[:, None])
            logits = torch.where(feed_mask.bool(), fresh, logits)
            positions = positions + feed_mask[:, 0]
            for i in idx.tolist():
                pending[i] = []
        return {
            "logits": logits,
            "mask": full_mask,
            "positions": positions,
            "pending": pending,
        }

    def _assemble(self, sessions, state: _Rows, device) -> RolloutBatch:
        n = self.params.n
        prompt_ids, prompt_mask = left_pad(
            [list(s.prompt_ids) for s in sessions], self.pad_id, device
        )
        lengths = [len(c) for c in state.completion]
        width = max(lengths)  # C

        def right(values: list[list], fill, dtype) -> Tensor:
            out = torch.full((len(values), width), fill, dtype=dtype)
            for i, row in enumerate(values):
                out[i, : len(row)] = torch.tensor(row, dtype=dtype)
            return out.to(device)

        tokenizer = self.engine.tokenizer
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=right(state.completion, self.pad_id, torch.long),
            completion_mask=right([[1] * k for k in lengths], 0, torch.long),
            logprobs=right(state.logprobs, 0.0, torch.float32),
            truncated=torch.tensor(state.truncated, dtype=torch.bool, device=device),
            group_ids=torch.arange(len(sessions), device=device) // n,
            texts=tokenizer.batch_decode(state.last_turn, skip_special_tokens=True),
            env_mask=right(state.from_env, 0, torch.long),
        )
