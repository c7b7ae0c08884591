"""What GRPO (grpo.py, with DAPO in dapo.py) and Kimi k1.5 (kimi.py) share: group rollouts.

Per rollout: choose the step's prompts, sample G completions of each from the shared
RolloutEngine, score them with the shared Scorer (rl_common.generate_and_score), let the
algorithm turn rewards into what its loss reads, and hand the samples to the loop as
micro-batches of `train.batch_size` rows. The rollout is reused for `num_iterations` optimizer
steps.

Deliberate choices:
- π_old: with num_iterations = 1 it is π_θ detached (ratio 1 in value, gradient still flows),
  so no extra forward pass; otherwise the engine's sampling-time log-probs are used (they equal
  a teacher-forced pass, tested), recomputed only under mixed precision.
- A step's micro-batches ARE its rollout, so `train.grad_accum` has no meaning here and any
  value but 1 is rejected; `data.max_length` bounds prompt + completion: prompts longer than
  `data.max_length - max_new_tokens` tokens keep their last tokens (the question and the
  generation prompt) and are counted in `prompts_truncated`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import Algorithm, StepSampler
from posttrain.algorithms.rl_common import (
    PROMPT_TOKENISATION,
    OnlineRLSettings,
    SampleLog,
    build_scorer,
    chunked,
    environment_runner,
    generate_and_score,
    greedy_accuracy,
    load_policy_and_prompts,
    process_share,
    reduce_means,
    reference_logprobs,
    rollout_metrics,
    to_policy_batches,
)
from posttrain.config import ConfigError, PositiveInt, Range, reject_unused
from posttrain.models.attention_support import fast_path
from posttrain.rollout import SamplingParams, sequence_logprobs


@dataclass
class GroupRolloutSettings(OnlineRLSettings):
    """Settings of every group-rollout trainer (the `grpo:` and `kimi:` sections)."""

    num_generations: Annotated[int, Range(ge=2)] = 8
    """G: completions sampled per prompt."""
    prompts_per_step: PositiveInt = 8
    """Prompts per rollout over all processes (must divide by the number of processes)."""
    num_iterations: PositiveInt = 1
    """Optimizer steps per rollout batch (μ); π_old log-probs are kept across them."""
    mask_truncated: bool = False
    """Exclude completions that hit max_new_tokens without EOS from the loss."""
    share_prompt_forward: bool = True
    """Training forwards run each prompt once for its num_generations completions (a 4-D
    mask keeps them apart; exact). Needs sdpa attention and micro-batches of whole groups."""


def group_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N/G,) True for groups whose rewards are not all equal (they carry a learning signal)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(1) != grouped.amin(1)


class GroupRL(Algorithm):
    """The shared trainer; subclasses set `section` and `name` and implement the hooks below."""

    section = "grpo"  # the recipe section holding this trainer's GroupRolloutSettings

    @property
    def settings(self) -> GroupRolloutSettings:
        return getattr(self.cfg, self.section)

    # ---- hooks ---------------------------------------------------------------------------

    def reward_functions(self) -> list:
        return list(self.settings.rewards)

    def uses_kl(self) -> bool:
        """Whether the loss reads reference log-probs (then `load_reference` is called)."""
        return False

    def load_reference(self, model, accelerator: Accelerator):
        """A frozen reference, or None: the policy with its LoRA adapter disabled."""
        return None

    def make_sampler(self):
        return StepSampler(len(self.data), self.cfg.train.seed)

    def step_prompts(self, step: int) -> list[int]:
        """The step's global prompt indices, identical on every process."""
        return self.sampler.global_batch(step, self.settings.prompts_per_step)

    def score(self, scores, step: int, indices: list[int]) -> tuple[torch.Tensor, dict]:
        """(rewards (N,), extra metrics) from the Scorer's result."""
        return scores.rewards, {}

    def refill(self, step, accelerator, model, rollout, rewards, seed) -> tuple:
        """(rollout, rewards, metrics) after an optional filter of the groups (DAPO)."""
        return rollout, rewards, {}

    def advantages(
        self,
        rewards: torch.Tensor,
        accelerator: Accelerator,
        loss_mask: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
    ) -> torch.Tensor:
        """(N,) per-sequence or (N, C) per-token advantages. old_logprobs: π_old (the engine's
        sampling log-probs when num_iterations = 1); ref_logprobs: None unless `uses_kl`."""
        return torch.zeros_like(rewards)

    def sampling_logprobs(self, rollout) -> torch.Tensor | None:
        """The engine's sampling log-probs μ to carry in each PolicyBatch (rollout correction),
        or None (the default: the loss does not read them)."""
        return None

    # ---- setup ---------------------------------------------------------------------------

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg, g = self.cfg, self.settings
        self.validate(accelerator)
        self.tokenizer, model, self.data, self.eval_data = load_policy_and_prompts(cfg, self)
        self.environment = environment_runner(g, self.section, self.tokenizer, model)
        functions = self.reward_functions()
        # with an environment, `rewards: []` leaves the environment's rewards alone
        self.scorer = (
            build_scorer(
                functions, g.failure_reward, g.reward_timeout_s, self.provided.reward_functions
            )
            if functions or self.environment is None
            else None
        )
        self.reference = self.load_reference(model, accelerator) if self.uses_kl() else None
        self.sampler = self.make_sampler()
        self.buffer: list = []
        self.rollout_metrics: dict = {}
        self.samples = SampleLog(cfg.logging.samples_every, cfg.logging.samples_count)
        self.rollouts_done = 0
        shared = g.share_prompt_forward and fast_path(model, "custom_mask", accelerator.print)
        fast_path(model, "shared_decode", accelerator.print)  # the engine steps aside itself
        self.group_size = g.num_generations if shared else 1
        return model

    def validate(self, accelerator: Accelerator) -> None:
        cfg, g, world, s = self.cfg, self.settings, accelerator.num_processes, self.section
        if g.prompts_per_step % world:
            raise ConfigError(
                f"{self.name}: {s}.prompts_per_step={g.prompts_per_step} must divide by the "
                f"{world} processes"
            )
        if g.num_generations < 2:
            raise ConfigError(
                f"{self.name}: {s}.num_generations must be at least 2 (advantages are relative "
                "to the group)"
            )
        reject_unused(
            cfg,
            self.name,
            {
                "data.format": "prompt rows always have a prompt column",
                "data.packing": f"{s}.share_prompt_forward runs each prompt once for its group",
                "data.truncation_side": "prompts longer than data.max_length always keep their "
                "last tokens",
                **PROMPT_TOKENISATION,
            },
        )
        if cfg.train.grad_accum != 1:
            raise ConfigError(
                f"{self.name}: train.grad_accum={cfg.train.grad_accum} is not used: a step's "
                f"micro-batches are its rollout ({s}.prompts_per_step x {s}.num_generations "
                "samples) in rows of train.batch_size; set train.grad_accum=1"
            )
        if g.max_new_tokens >= cfg.data.max_length:
            raise ConfigError(
                f"{self.name}: data.max_length={cfg.data.max_length} (prompt + completion) "
                f"leaves no room for a prompt after {s}.max_new_tokens={g.max_new_tokens}"
            )

    # ---- rollout -------------------------------------------------------------------------

    def generate(self, model, accelerator: Accelerator, indices: list[int], seed: int):
        g = self.settings
        params = SamplingParams(
            n=g.num_generations,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            max_new_tokens=g.max_new_tokens,
            stop=list(g.stop),
            seed=seed,
        )
        return generate_and_score(
            accelerator.unwrap_model(model),
            self.tokenizer,
            self.data,
            self.scorer,
            indices,
            params,
            max_prompt_tokens=self.cfg.data.max_length - g.max_new_tokens,
            environment=self.environment,
            max_turns=g.max_turns,
        )

    def make_rollout(self, step: int, accelerator: Accelerator, model) -> list:
        cfg, g = self.cfg, self.settings
        started = time.perf_counter()
        seed = cfg.train.seed * 7919 + step
        indices = process_share(self.step_prompts(step), accelerator)
        rollout, scores, stats = self.generate(model, accelerator, indices, seed)
        rewards, extra = self.score(scores, step, indices)
        prompts = [self.data.prompts[i] for i in indices for _ in range(g.num_generations)]
        self.samples.record(step + 1, prompts, rollout, scores)
        metrics = {
            **rollout_metrics(rollout, scores, stats),
            **extra,
            "zero_std_fraction": float((~group_spread(rewards, g.num_generations)).float().mean()),
        }
        rollout, rewards, refill_metrics = self.refill(
            step, accelerator, model, rollout, rewards, seed
        )
        metrics.update(refill_metrics)
        loss_mask = rollout.sampled_mask.clone()  # completion_mask unless an environment spoke
        if g.mask_truncated:
            loss_mask[rollout.truncated] = 0
        old = None
        if g.num_iterations > 1:
            old = rollout.logprobs
            if cfg.train.mixed_precision != "no":  # match the training forward's precision
                with accelerator.autocast(), torch.no_grad():
                    old = chunked(
                        sequence_logprobs,
                        accelerator.unwrap_model(model),
                        rollout,
                        cfg.train.batch_size,
                        g.temperature,
                        group_size=self.group_size,
                    )
        ref = None
        if self.uses_kl():
            with accelerator.autocast():
                ref = reference_logprobs(
                    self.reference,
                    model,
                    rollout,
                    g.temperature,
                    cfg.train.batch_size,
                    self.group_size,
                )
        if rollout.env_mask is not None:  # environment tokens: no log-prob, ratio or KL
            old = None if old is None else old * loss_mask
            ref = None if ref is None else ref * loss_mask
        policy_old = rollout.logprobs if old is None else old
        advantages = self.advantages(rewards, accelerator, loss_mask, policy_old, ref)
        metrics["rollout_seconds"] = time.perf_counter() - started
        self.rollout_metrics = reduce_means(accelerator, metrics)
        self.rollouts_done += 1
        return to_policy_batches(
            rollout,
            advantages,
            rewards,
            loss_mask,
            old,
            ref,
            cfg.train.batch_size,
            rollout_logprobs=self.sampling_logprobs(rollout),
        )

    def policy_logprobs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) log π_θ of the batch's completions and the (N, C) entropy, with gradient;
        0 outside completion_mask (on a multi-turn batch's environment tokens too)."""
        attended = batch.completion_mask if batch.attention_mask is None else batch.attention_mask
        logprobs, entropy = sequence_logprobs(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            attended,
            self.settings.temperature,
            return_entropy=True,
            group_size=self.group_size,
        )
        if batch.attention_mask is not None:
            logprobs, entropy = logprobs * batch.completion_mask, entropy * batch.completion_mask
        return logprobs, entropy

    # ---- loop interface ------------------------------------------------------------------

    def micro_batches(self, step: int, accelerator: Accelerator, model) -> list:
        if step % self.settings.num_iterations == 0 or not self.buffer:
            self.buffer = self.make_rollout(step, accelerator, model)
        return self.buffer

    def on_step_end(self, model, step: int, accelerator: Accelerator) -> dict:
        metrics, self.rollout_metrics = self.rollout_metrics, {}
        return metrics

    def pop_samples(self) -> list[dict]:
        return self.samples.pop()

    @torch.no_grad()
    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if self.eval_data is None or "answer" not in self.eval_data.columns:
            return {}
        limit = min(len(self.eval_data), self.cfg.data.max_eval_examples)
        policy = accelerator.unwrap_model(model)
        args = (self.eval_data, limit, self.settings.max_new_tokens, accelerator)
        env = {"environment": self.environment, "max_turns": self.settings.max_turns}
        return {"accuracy": greedy_accuracy(policy, self.tokenizer, *args, **env)}

    def state_dict(self) -> dict:
        return {"rollouts_done": self.rollouts_done}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts_done = state.get("rollouts_done", 0)
