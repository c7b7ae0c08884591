"""PPO actor-critic RLHF (spec §6, §12; Ziegler et al. 2019, Ouyang et al. 2022, Schulman et al.
2017) on the shared loop, RolloutEngine and Scorer.

Per rollout: sample with the RolloutEngine, score with the Scorer (rule rewards, a reward model
through the `reward_model` built-in, or both weighted), optionally standardise the scores with
their running mean/std, shape per-token rewards r_t = -β·KL_t(π_old ‖ π_ref) plus the score on
the last token, run GAE(γ, λ) over the critic's rollout-time values V_old, whiten the advantages
over the whole rollout (all processes), and update β with the KL controller.

On the one loop: a rollout of R sequences per process is cut into minibatches of
train.batch_size × train.grad_accum sequences (reshuffled each epoch); every loop step trains ONE
minibatch (its micro-batches are train.batch_size chunks), so a rollout serves
ppo_epochs × R / minibatch optimizer steps. When a step's approx KL (all its micro-batches and
processes) exceeds `max_approx_kl`, the rest of the rollout is skipped and the next step samples.

The critic (models/value_head.py) is a second model that PPO registers with the loop as an
extra Trainable (its own AdamW at ppo.critic_lr, same schedule): the loop prepares, shards,
clips, skips and checkpoints it with the policy. `compute_loss` returns
policy + vf_coef·value − entropy_coef·entropy, all token sums, so the loop's one backward and
global token normalisation serve both models.

Minibatches are drawn from the global rollout: every process gathers all processes' rows and
the same seeded permutation, then trains its share of each global minibatch, so a run on 2
processes takes the same steps as 1 process with the same global batch. The KL controller,
score statistics and the unfinished rollout (rows and minibatch plan) are algorithm state: a
resume mid-rollout continues exactly.

Deliberate choices and deviations:
- π_old is the sampling policy: the engine's log-probs (equal to a teacher-forced pass),
  recomputed under mixed precision so the ratio compares like with like (as grpo.py).
- The score goes on the last sampled token (EOS included), truncated completions too. The KL in
  the reward is k1 by default (`kl_estimator: k3` is unbiased and never negative).
- The adaptive controller reads the rollout's mean per-sequence KL, with n = the rollout's global
  number of sequences (as TRL), once per rollout.
- Explained variance is logged per rollout from V_old and the returns (as cleanrl).
- Not implemented: a critic sharing the policy's backbone (policy adapter + value head);
  fp16 (Accelerate keeps one GradScaler for both optimisers, which it would unscale twice).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from posttrain.algorithms.base import Algorithm, StepSampler, Trainable
from posttrain.algorithms.ppo_rollout import (
    PPOBatch,
    RunningMoments,
    estimate_advantages,
    gather_rollout,
    global_moments,
    local_rows,
    minibatch_plan,
    restore_rollout,
    rollout_state,
)
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
    load_reference,
    process_share,
    reduce_means,
    reference_logprobs,
    rollout_metrics,
)
from posttrain.config import (
    BaseRecipe,
    ConfigError,
    Fraction,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    reject_unused,
)
from posttrain.losses.common import masked_sum
from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    ppo_policy_loss,
    ppo_value_loss,
)
from posttrain.losses.types import LossOutput
from posttrain.models.value_head import critic_values, load_critic, save_critic
from posttrain.rollout import SamplingParams, sequence_logprobs

TRUNCATION_REASON = "prompts longer than data.max_length always keep their last tokens"


@dataclass
class PPOConfig(OnlineRLSettings):
    prompts_per_rollout: PositiveInt = 64
    """Prompts per rollout over all processes (must divide by the number of processes)."""
    samples_per_prompt: PositiveInt = 1
    """Completions sampled per prompt."""
    ppo_epochs: PositiveInt = 4
    """Passes over each rollout; one optimizer step per minibatch of batch_size × grad_accum rows."""
    normalize_scores: bool = False
    """Standardise scores with the running mean/std of every score so far (kept in checkpoints)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate in the reward: k1 = log π_old - log π_ref, or k3."""
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    """Keep β constant, or adapt it toward target_kl (Ziegler et al. 2019)."""
    init_kl_coef: NonNegativeFloat = 0.05
    """β, the KL penalty coefficient (its start value when adaptive); 0 with fixed: no reference."""
    target_kl: PositiveFloat = 6.0
    """Adaptive control: target per-sequence KL (nats)."""
    kl_horizon: PositiveFloat = 10000.0
    """Adaptive control: horizon in sequences (smaller reacts faster)."""
    reference: str = ""
    """Reference checkpoint for the KL penalty; empty: the starting policy."""
    gamma: Fraction = 1.0
    """GAE discount γ."""
    lam: Fraction = 0.95
    """GAE λ."""
    whiten_advantages: bool = True
    """Standardise advantages over the rollout batch (all processes)."""
    clip_range: PositiveFloat = 0.2
    """Policy ratio clip ε."""
    clip_range_value: PositiveFloat = 0.2
    """Value clip ε_v around V_old."""
    vf_coef: NonNegativeFloat = 0.1
    """Weight of the value loss in the total."""
    entropy_coef: NonNegativeFloat = 0.0
    """Entropy bonus weight (0: entropy is only logged)."""
    max_approx_kl: NonNegativeFloat = 0.0
    """Skip the rest of a rollout once a step's approx KL to π_old exceeds this (0: never)."""
    critic_init: str = "policy"
    """Critic backbone and head: reward (the reward_model reward's path), policy, or a PATH."""
    critic_lr: PositiveFloat = 1e-5
    """Peak learning rate of the critic's AdamW (same schedule and weight decay as optim)."""


@dataclass
class PPORecipe(BaseRecipe):
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO settings."""


class PPO(Algorithm):
    name = "ppo"

    def setup(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg, p = self.cfg, self.cfg.ppo
        self._validate(accelerator)
        self.accelerator = accelerator
        self.tokenizer, model, self.data, self.eval_data = load_policy_and_prompts(cfg, self)
        self.environment = environment_runner(p, "ppo", self.tokenizer, model)
        # with an environment, `rewards: []` leaves the environment's rewards alone
        self.scorer = (
            build_scorer(
                list(p.rewards),
                p.failure_reward,
                p.reward_timeout_s,
                self.provided.reward_functions,
            )
            if p.rewards or self.environment is None
            else None
        )
        self.reference = None
        self.use_reference = p.kl_control == "adaptive" or p.init_kl_coef > 0
        if self.use_reference:
            self.reference = load_reference(cfg.model, p.reference, model, accelerator)
        if p.kl_control == "adaptive":
            self.kl_ctl = AdaptiveKLController(p.init_kl_coef, p.target_kl, p.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(p.init_kl_coef)
        self.sampling = SamplingParams(
            n=p.samples_per_prompt,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            max_new_tokens=p.max_new_tokens,
            stop=list(p.stop),
        )
        self.moments = RunningMoments()
        self.sampler = StepSampler(len(self.data), cfg.train.seed)
        # The loop gives it AdamW (critic_lr, the policy's schedule), prepares and steps it.
        self.critic_trainable = Trainable(
            "critic",
            load_critic(cfg.model, self._critic_path()),
            dataclasses.replace(cfg.optim, lr=p.critic_lr),
        )
        self.rollout: PPOBatch | None = None
        self.plan = torch.zeros(0, 0, dtype=torch.long)  # (steps, minibatch) rows per step
        self.cursor = 0  # next row of `plan`
        self.rollouts_done = 0
        self.early_stops = 0
        self.rollout_metrics: dict = {}
        self.samples = SampleLog(cfg.logging.samples_every, cfg.logging.samples_count)
        return model

    @property
    def critic(self) -> torch.nn.Module:
        """The critic as the loop prepared it (before `prepare`: as loaded)."""
        return self.critic_trainable.module

    def extra_trainables(self) -> list[Trainable]:
        return [self.critic_trainable]

    def _critic_path(self) -> str:
        p = self.cfg.ppo
        if p.critic_init == "policy":
            return self.cfg.model.name_or_path
        if p.critic_init == "reward":
            paths = [f.params.get("path") for f in p.rewards if f.name == "reward_model"]
            if not paths or not paths[0]:
                raise ConfigError(
                    "ppo.critic_init=reward needs a reward_model entry with params {path: ...} "
                    "in ppo.rewards"
                )
            return str(paths[0])
        return p.critic_init

    def _validate(self, accelerator: Accelerator) -> None:
        cfg, p, world = self.cfg, self.cfg.ppo, accelerator.num_processes
        rows = p.prompts_per_rollout // world * p.samples_per_prompt  # per process
        minibatch = cfg.train.batch_size * cfg.train.grad_accum
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "ppo trains two models (policy and critic) and Accelerate drives one DeepSpeed "
                "engine per run: use train.sharding=fsdp2 for sharded PPO"
            )
        if cfg.train.mixed_precision == "fp16":
            raise ConfigError(
                "ppo does not support train.mixed_precision=fp16 (one GradScaler would unscale "
                "the policy's and the critic's optimisers twice); use bf16"
            )
        reject_unused(
            cfg,
            "ppo",
            {
                "data.format": "prompt rows",
                "data.packing": "sampled rows",
                "data.truncation_side": TRUNCATION_REASON,
                **PROMPT_TOKENISATION,
            },
        )
        if p.max_new_tokens >= cfg.data.max_length:
            raise ConfigError(
                f"ppo: data.max_length={cfg.data.max_length} (prompt + completion) leaves no room "
                f"for a prompt after ppo.max_new_tokens={p.max_new_tokens}"
            )
        if p.prompts_per_rollout % world or rows % minibatch:
            raise ConfigError(
                f"ppo.prompts_per_rollout={p.prompts_per_rollout} must divide by the {world} "
                f"processes, and the {rows} sequences per process (× ppo.samples_per_prompt) "
                f"must be a multiple of the minibatch train.batch_size × train.grad_accum = "
                f"{minibatch}"
            )

    # ---- rollout ------------------------------------------------------------------------

    def make_rollout(self, accelerator: Accelerator, model, step: int = 0) -> None:
        """Sample, score and estimate advantages for the optimizer steps from `step` on."""
        cfg, p, n = self.cfg, self.cfg.ppo, self.cfg.ppo.samples_per_prompt
        started = time.perf_counter()
        index = self.rollouts_done
        seed = cfg.train.seed * 7919 + index
        indices = process_share(
            self.sampler.global_batch(index, p.prompts_per_rollout), accelerator
        )
        policy = accelerator.unwrap_model(model)
        params = dataclasses.replace(self.sampling, seed=seed)
        rollout, scored, stats = generate_and_score(
            policy,
            self.tokenizer,
            self.data,
            self.scorer,
            indices,
            params,
            max_prompt_tokens=cfg.data.max_length - p.max_new_tokens,
            environment=self.environment,
            max_turns=p.max_turns,
        )
        prompts = [self.data.prompts[i] for i in indices for _ in range(n)]
        self.samples.record(step + 1, prompts, rollout, scored)
        scores = scored.rewards  # (N,)
        if p.normalize_scores:
            self.moments.update(*global_moments(scores, None, accelerator))
            scores = (scores - self.moments.mean) / max(self.moments.std, 1e-8)
        mask = rollout.sampled_mask  # (N, C) completion_mask unless an environment spoke
        chunk = cfg.train.batch_size
        with torch.no_grad(), accelerator.autocast():
            old = rollout.logprobs  # (N, C)
            if cfg.train.mixed_precision != "no":  # match the training forward's precision
                old = chunked(sequence_logprobs, policy, rollout, chunk, p.temperature)
            critic = accelerator.unwrap_model(self.critic)
            critic.eval()  # no dropout in V_old
            values = chunked(critic_values, critic, rollout, chunk)
            critic.train()
            ref = old  # no reference: KL 0
            if self.use_reference:
                ref = reference_logprobs(self.reference, model, rollout, p.temperature, chunk)
        if rollout.env_mask is not None:  # environment tokens: no log-prob, ratio or KL
            old, ref = old * mask, ref * mask
        beta = self.kl_ctl.value
        advantages, returns, shaped = estimate_advantages(
            scores, old, ref, values, mask, beta, p, accelerator
        )
        metrics = {
            **rollout_metrics(rollout, scored, stats),
            **shaped,
            "score": float(scored.rewards.mean()),
        }
        metrics["rollout_seconds"] = time.perf_counter() - started
        self.rollout_metrics = reduce_means(accelerator, metrics)
        # β is the same on every process: it follows the process-averaged KL.
        self.rollout_metrics["kl_coef"] = beta
        self.kl_ctl.update(self.rollout_metrics["kl"], p.prompts_per_rollout * n)
        if p.normalize_scores:
            self.rollout_metrics.update(score_mean=self.moments.mean, score_std=self.moments.std)
        local = PPOBatch.of(rollout, old, values, advantages, returns)
        self.rollout = gather_rollout(local, accelerator)
        self.plan = minibatch_plan(
            len(self.rollout), self._global_minibatch(), p.ppo_epochs, cfg.train.seed, index
        )
        self.cursor = 0
        self.rollouts_done += 1

    # ---- loop interface -------------------------------------------------------------------

    def micro_batches(self, step: int, accelerator: Accelerator, model) -> list:
        if self.rollout is None or self.cursor >= len(self.plan):
            self.make_rollout(accelerator, model, step)
        rows = local_rows(self.plan[self.cursor], self.cfg.train.batch_size, accelerator)
        self.cursor += 1
        micro = [self.rollout.select(r) for r in rows]
        self._step_kl = torch.zeros(2, device=accelerator.device)  # approx-KL·tokens, tokens
        return micro

    def num_units(self, batch) -> int:
        mask = batch.completion_mask if batch.loss_mask is None else batch.loss_mask
        return int(mask.sum())

    def compute_loss(self, model, batch) -> LossOutput:
        p = self.cfg.ppo
        rows = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        logprobs, entropy = sequence_logprobs(model, *rows, p.temperature, return_entropy=True)
        # The loop syncs the critic's gradients on the step's last micro-batch only, as the policy's.
        values = critic_values(self.critic, *rows)  # (N, C), like logprobs and entropy
        mask = batch.completion_mask.bool()
        if batch.loss_mask is not None:  # multi-turn: the environment's tokens carry no loss
            mask = batch.loss_mask.bool()
            logprobs, entropy = logprobs * mask, entropy * mask
        policy = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, p.clip_range)
        value = ppo_value_loss(values, batch.old_values, batch.returns, mask, p.clip_range_value)
        if p.entropy_coef == 0:
            entropy = entropy.detach()
        entropy_sum = masked_sum(entropy, mask)
        total = policy.total + p.vf_coef * value.total - p.entropy_coef * entropy_sum
        tokens = mask.sum().clamp(min=1).float()
        self._step_kl += torch.stack([policy.metrics["approx_kl"] * tokens, tokens])
        metrics = {
            **policy.metrics,
            "value_clip_fraction": value.metrics["value_clip_fraction"],
            "policy_loss": policy.total.detach() / tokens,
            "value_loss": value.total.detach() / tokens,
            "entropy": entropy_sum.detach() / tokens,
        }
        return LossOutput(total=total, units=mask.sum().float(), metrics=metrics)

    def on_step_end(self, model, step: int, accelerator: Accelerator) -> dict:
        kl_sum, tokens = accelerator.reduce(self._step_kl, reduction="sum").tolist()
        approx_kl = kl_sum / max(tokens, 1.0)
        p = self.cfg.ppo
        if p.max_approx_kl > 0 and approx_kl > p.max_approx_kl and self.cursor < len(self.plan):
            self.cursor = len(self.plan)  # skip the rest of this rollout
            self.early_stops += 1
        return {
            **self.rollout_metrics,
            "early_stops": self.early_stops,
            "rollouts": self.rollouts_done,
        }

    def pop_samples(self) -> list[dict]:
        return self.samples.pop()

    def epoch_at(self, step: int) -> float:
        return self.rollouts_done * self.cfg.ppo.prompts_per_rollout / len(self.data)

    def evaluate(self, model, accelerator: Accelerator) -> dict[str, float]:
        if self.eval_data is None or "answer" not in self.eval_data.columns:
            return {}
        policy = accelerator.unwrap_model(model)
        limit = min(len(self.eval_data), self.cfg.data.max_eval_examples)
        args = (self.eval_data, limit, self.cfg.ppo.max_new_tokens)
        env = {"environment": self.environment, "max_turns": self.cfg.ppo.max_turns}
        return {"accuracy": greedy_accuracy(policy, self.tokenizer, *args, accelerator, **env)}

    def save_final(self, model, path, state_dicts) -> None:
        super().save_final(model, path, state_dicts)
        critic = self.accelerator.unwrap_model(self.critic)
        # beside final/ (path is final/'s temporary directory until it is renamed)
        out = Path(self.cfg.train.output_dir) / "critic"
        save_critic(critic, out, self.tokenizer, state_dict=state_dicts.get("critic"))

    # ---- checkpointed state ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """KL controller, score statistics, counters, and the unfinished global rollout with its
        minibatch plan (the same on every process)."""
        return {
            "rollouts_done": self.rollouts_done,
            "early_stops": self.early_stops,
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
            "rollout_metrics": dict(self.rollout_metrics),
            "rollout": rollout_state(self.rollout, self.plan, self.cursor),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rollouts_done = state["rollouts_done"]
        self.early_stops = state["early_stops"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        self.rollout_metrics = dict(state["rollout_metrics"])
        self.rollout, self.plan, self.cursor = restore_rollout(
            state["rollout"], self._global_minibatch(), self.accelerator
        )

    def _global_minibatch(self) -> int:
        train = self.cfg.train
        return train.batch_size * train.grad_accum * self.accelerator.num_processes
