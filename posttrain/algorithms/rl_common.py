"""Pieces every online RL algorithm shares: prompt data, prompt sampling (uniform or
prioritised by failure rate), reward-function configs, reference models, and the
conversion of a scored rollout into policy micro-batches.

Process layout: a step's global set of prompts is chosen identically on every process (same
seed, same step), and each process generates the complete groups of its contiguous share, so
group statistics never need a collective; batch-wide statistics are gathered.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

import torch
from accelerate import Accelerator

from posttrain.algorithms.base import Algorithm, is_provided_model
from posttrain.config import (
    AnyFloat,
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Range,
    RewardFunctionConfig,  # noqa: F401  (defined beside EvaluationConfig, re-exported here)
)
from posttrain.data.batches import PolicyBatch
from posttrain.data.encoding import check_prompts
from posttrain.data.loading import DataError, Source, load_rows, require_columns
from posttrain.data.sources import describe, eval_source, mix, train_sources
from posttrain.envs.rollouts import environment_accuracy, environment_generate_and_score
from posttrain.envs.session import EnvRunner
from posttrain.evaluation import accuracy_of
from posttrain.models.lm_head import configure as configure_head
from posttrain.models.loading import apply_lora, is_peft_model, load_causal_lm, load_tokenizer
from posttrain.models.sharding import full_parameters, shard_frozen
from posttrain.rollout import RolloutBatch, RolloutEngine, SamplingParams, sequence_logprobs
from posttrain.scoring import RewardSpec, Scorer
from posttrain.utils import eos_ids


@dataclass
class OnlineRLSettings:
    """Sampling and scoring settings every online trainer shares (GRPO, Kimi, PPO inherit them,
    so their recipe keys stay flat: `grpo.temperature`, `ppo.temperature`)."""

    max_new_tokens: PositiveInt = 32
    """Generation budget per completion (L_max for dr_grpo)."""
    temperature: NonNegativeFloat = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling threshold."""
    top_k: NonNegativeInt = 0
    """Top-k sampling (0: off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings besides EOS."""
    rewards: list[RewardFunctionConfig] = field(default_factory=lambda: [RewardFunctionConfig()])
    """Reward functions and weights (e.g. reward_model with params {path: ...})."""
    failure_reward: AnyFloat = 0.0
    """Reward given to samples whose reward function raised, timed out or returned NaN."""
    reward_timeout_s: NonNegativeFloat = 60.0
    """Seconds one call of a reward function may take; a call still running then is abandoned
    and its samples score failure_reward (counted as rewards/NAME/timeouts). 0: no limit."""
    environment: str = ""
    """Multi-turn rollouts in an environment: a built-in (tools) or `module:Class` (posttrain/
    envs); empty: single-turn completions."""
    tools: list[str] = field(default_factory=list)
    """Tools the environment is given: built-in (calculator, python) or `module:function`."""
    max_turns: PositiveInt = 4
    """Most assistant turns per episode with an environment (max_new_tokens bounds each)."""
    env_timeout_s: NonNegativeFloat = 30.0
    """Seconds one environment step may take; a step that raises or outlives it ends the episode
    with failure_reward (counted as env/errors, env/timeouts). 0: no limit."""


# RL prompts are tokenised as they are sampled, not by datasets.map at load time.
PROMPT_TOKENISATION = {
    "data.num_proc": "prompts are tokenised by the rollout engine as they are sampled",
    "data.cache": "prompts are tokenised by the rollout engine as they are sampled",
}


def load_policy_and_prompts(cfg, algorithm: Algorithm | None = None) -> tuple:
    """What every online trainer starts from: (tokenizer, policy model with LoRA when asked,
    training prompts, held-out prompts or None). `algorithm`: use the model and tokenizer it
    was handed by the Python API, if any."""
    if algorithm is not None:
        tokenizer, model = algorithm.load_tokenizer(), algorithm.load_model()
    else:
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        model = load_causal_lm(cfg.model)
    if cfg.model.lora.r > 0:
        model = apply_lora(model, cfg.model.lora)
    configure_head(model, cfg.model.logit_chunk_tokens)
    data = PromptData(train_sources(cfg.data), cfg.train.seed)
    held_out = eval_source(cfg.data)
    eval_data = PromptData([held_out]) if held_out is not None else None
    for prompts in (data, eval_data) if eval_data else (data,):  # chat prompts: template, roles
        check_prompts(tokenizer, prompts.prompts, prompts.path)
    return tokenizer, model, data, eval_data


def environment_runner(
    settings: OnlineRLSettings, section: str, tokenizer, model
) -> EnvRunner | None:
    """The recipe's environment (None for single-turn rollouts); its keys are rejected when
    there is no environment, and stop strings with one (a turn ends at EOS)."""
    if not settings.environment:
        unused = {"tools": [], "max_turns": 4, "env_timeout_s": 30.0}
        for key, default in unused.items():
            if getattr(settings, key) != default:
                raise ConfigError(
                    f"{section}.{key} is used only with {section}.environment (multi-turn "
                    "rollouts); set an environment or remove it"
                )
        return None
    if settings.stop:
        raise ConfigError(
            f"{section}.stop is not used with {section}.environment: a turn ends at EOS, where "
            "the chat template closes it, so the environment's reply can follow"
        )
    return EnvRunner(
        settings.environment,
        tokenizer,
        tools=list(settings.tools),
        timeout_s=settings.env_timeout_s,
        failure_reward=settings.failure_reward,
        eos_ids=eos_ids(model, tokenizer),
    )


def build_scorer(
    functions: list[RewardFunctionConfig],
    failure_reward: float,
    timeout_s: float,
    provided: Mapping[str, Callable] | None = None,
) -> Scorer:
    """`provided`: callables (from the Python API) for the entries of those names."""
    provided = provided or {}
    specs = [
        RewardSpec(
            name=f.name, weight=f.weight, params=dict(f.params), function=provided.get(f.name)
        )
        for f in functions
    ]
    if not specs:
        raise DataError("at least one reward function is needed (section rewards)")
    return Scorer(
        specs, failure_reward=failure_reward, timeout_s=timeout_s if timeout_s > 0 else None
    )


class PromptData:
    """Prompt rows plus their other columns (passed to reward functions)."""

    def __init__(self, path: str | list[Source], seed: int = 0):
        sources = path if isinstance(path, list) else [Source(path)]
        self.path = describe(sources)
        self.rows = mix([load_rows(s) for s in sources], sources, seed)
        require_columns(
            self.rows,
            ["prompt"],
            self.path,
            "'prompt' (and the columns your rewards read, e.g. 'answer')",
        )
        self.columns = [c for c in self.rows.column_names if c != "prompt"]
        self.prompts = self.rows["prompt"]
        self.extra = {c: self.rows[c] for c in self.columns}

    def __len__(self) -> int:
        return len(self.prompts)

    def columns_for(self, indices: list[int], repeat: int) -> dict[str, list]:
        """Each column's values for the samples of `indices`, every value repeated `repeat` times."""
        return {
            c: [values[i] for i in indices for _ in range(repeat)]
            for c, values in self.extra.items()
        }


class PrioritizedSampler:
    """Kimi k1.5 curriculum: draw prompts with probability ∝ (1 - success rate so far).

    Unseen prompts count as never solved (weight 1); a floor keeps solved ones drawable.
    Every process draws the same prompts (generator seeded by seed and step) and applies the
    same gathered updates, so the state stays identical across processes.
    """

    def __init__(self, num_prompts: int, seed: int, floor: float = 0.05):
        self.seed = seed
        self.floor = floor
        self.attempts = torch.zeros(num_prompts)
        self.successes = torch.zeros(num_prompts)

    def draw(self, step: int, count: int) -> list[int]:
        rate = self.successes / self.attempts.clamp(min=1)
        weights = (1.0 - rate).clamp(min=self.floor)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        replacement = count > len(weights)
        return torch.multinomial(
            weights, count, replacement=replacement, generator=generator
        ).tolist()

    def update(self, indices: list[int], successes: list[float]) -> None:
        for i, s in zip(indices, successes):
            self.attempts[i] += 1
            self.successes[i] += float(s)

    def state_dict(self) -> dict:
        return {"attempts": self.attempts.tolist(), "successes": self.successes.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.attempts = torch.tensor(state["attempts"])
        self.successes = torch.tensor(state["successes"])


def process_share(global_indices: list[int], accelerator: Accelerator) -> list[int]:
    world, rank = accelerator.num_processes, accelerator.process_index
    per = len(global_indices) // world
    return global_indices[rank * per : (rank + 1) * per]


def load_reference(cfg_model, reference_path: str, policy, accelerator) -> torch.nn.Module | None:
    """A frozen reference placed like the policy (sharded under FSDP2/ZeRO-3), or None when the
    policy is a LoRA model (then the reference is the same model with its adapter disabled: no
    second copy of the weights)."""
    if is_peft_model(policy) and not reference_path:
        return None
    if is_provided_model(policy) and not reference_path:  # handed in by the Python API
        return shard_frozen(accelerator, copy.deepcopy(policy))  # before any training step
    ref_cfg = (
        cfg_model
        if not reference_path
        else type(cfg_model)(
            name_or_path=reference_path,
            dtype=cfg_model.dtype,
            trust_remote_code=cfg_model.trust_remote_code,
            attn_implementation=cfg_model.attn_implementation,
        )
    )
    reference = load_causal_lm(ref_cfg)
    configure_head(reference, cfg_model.logit_chunk_tokens)  # before sharding: see plan_of
    return shard_frozen(accelerator, reference)


def generate_and_score(
    policy,
    tokenizer,
    data,
    scorer,
    indices: list[int],
    params: SamplingParams,
    max_prompt_tokens: int | None = None,
    environment: EnvRunner | None = None,
    max_turns: int = 1,
):
    """(rollout, scores, engine stats): `params.n` samples of each prompt of `data` at `indices`
    from the shared RolloutEngine (one seed per prompt, so sharding over processes changes no
    sample), scored by the shared Scorer with the data's other columns.

    max_prompt_tokens: longer prompts keep their LAST tokens (the question and the generation
    prompt); stats["prompts_truncated"] is the fraction that were cut.
    environment: multi-turn conversations in it, up to max_turns assistant turns
    (envs/rollouts.py; prompts are the environment's and are not cut)."""
    if environment is not None:
        return environment_generate_and_score(
            policy, tokenizer, data, scorer, environment, indices, params, max_turns
        )
    engine = RolloutEngine(policy, tokenizer)
    prompts = [data.prompts[i] for i in indices]
    seeds = [params.seed * 1_000_003 + i for i in indices]
    inputs, truncated = prompts, 0
    if max_prompt_tokens is not None:
        encoded = [engine.encode(p) for p in prompts]
        truncated = sum(len(ids) > max_prompt_tokens for ids in encoded)
        inputs = [ids[-max_prompt_tokens:] for ids in encoded]
    rollout = engine.generate(inputs, params, prompt_seeds=seeds)
    scored = scorer(
        [prompt for prompt in prompts for _ in range(params.n)],
        rollout.texts,
        completion_lengths=rollout.lengths.tolist(),
        truncated=rollout.truncated.tolist(),
        **data.columns_for(indices, params.n),
    )
    return rollout, scored, {**engine.last_stats, "prompts_truncated": truncated / len(prompts)}


def rollout_metrics(rollout: RolloutBatch, scored, stats: dict) -> dict[str, float]:
    """This process's metrics of a scored rollout that every online trainer logs: the scorer's
    own, lengths, truncation (of completions and of prompts), sampling speed and, when an
    `accuracy` reward ran, its mean."""
    metrics = {
        **scored.metrics,
        "completion_length": float(rollout.lengths.float().mean()),
        "truncation_rate": float(rollout.truncated.float().mean()),
        "prompts_truncated": stats["prompts_truncated"],
        "rollout_tokens_per_s": stats["tokens_per_s"],
    }
    if "accuracy" in scored.per_function:
        metrics["accuracy"] = float(scored.per_function["accuracy"].mean())
    return metrics


@torch.no_grad()
def greedy_accuracy(
    policy,
    tokenizer,
    data,
    limit: int,
    max_new_tokens: int,
    accelerator: Accelerator,
    environment: EnvRunner | None = None,
    max_turns: int = 1,
) -> float:
    """Greedy exact-match accuracy on the first `limit` rows of `data` (prompt/answer), the rows
    shared out over processes; with an environment, of the last turn of each conversation."""
    mine = list(range(accelerator.process_index, limit, accelerator.num_processes))
    engine = RolloutEngine(policy, tokenizer)
    prompts, answers = [data.prompts[i] for i in mine], [data.extra["answer"][i] for i in mine]
    # A sharded policy is gathered once for the whole evaluation (a collective every process
    # joins), so processes may then run different numbers of generate calls.
    with full_parameters(policy):
        if environment is not None and mine:
            rows = [dict(data.rows[i]) for i in mine]
            result = environment_accuracy(
                policy, tokenizer, environment, rows, max_new_tokens, max_turns, data.path
            )
        else:
            result = accuracy_of(engine, prompts, answers, max_new_tokens) if mine else None
    result = result or {"accuracy": 0.0, "n": 0}
    right_n = torch.tensor([result["accuracy"] * result["n"], float(result["n"])])
    totals = accelerator.reduce(right_n.to(accelerator.device), reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def chunked(fn, model, rollout: RolloutBatch, chunk: int, *extra, **kwargs) -> torch.Tensor:
    """fn(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *extra, **kwargs)
    over chunks of `chunk` rows, concatenated: (N, C). The one chunked scoring loop (policy,
    reference and critic passes over a rollout)."""
    parts = [
        fn(
            model,
            r.prompt_ids,
            r.prompt_mask,
            r.completion_ids,
            r.completion_mask,
            *extra,
            **kwargs,
        )
        for r in rollout.split(chunk)
    ]
    return torch.cat(parts)


@torch.no_grad()
def reference_logprobs(
    reference,
    policy,
    rollout: RolloutBatch,
    temperature: float,
    chunk: int,
    group_size: int = 1,
) -> torch.Tensor:
    """(N, C) log-probs of the sampled tokens under the reference (chunked forward passes;
    group_size as in `sequence_logprobs`); reference None: the policy with its adapter off."""
    if reference is not None:
        return chunked(
            sequence_logprobs, reference, rollout, chunk, temperature, group_size=group_size
        )
    unwrapped = policy.module if hasattr(policy, "module") else policy
    with unwrapped.disable_adapter():
        return chunked(
            sequence_logprobs, unwrapped, rollout, chunk, temperature, group_size=group_size
        )


def to_policy_batches(
    rollout: RolloutBatch,
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    loss_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    micro_batch: int,
    rollout_logprobs: torch.Tensor | None = None,
) -> list[PolicyBatch]:
    """Split a scored rollout into micro-batches of `micro_batch` sequences (rollout_logprobs:
    the engine's sampling log-probs, for the rollout-mismatch correction)."""
    batches = []
    for start in range(0, len(rollout), micro_batch):
        rows = slice(start, start + micro_batch)
        prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
        batches.append(
            PolicyBatch(
                prompt_ids=rollout.prompt_ids[rows],
                prompt_mask=prompt_mask,
                completion_ids=rollout.completion_ids[rows],
                completion_mask=loss_mask[rows],
                advantages=advantages[rows],
                rewards=rewards[rows],
                old_logprobs=None if old_logprobs is None else old_logprobs[rows],
                ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
                num_tokens=int(prompt_mask.sum() + completion_mask.sum()),
                rollout_logprobs=None if rollout_logprobs is None else rollout_logprobs[rows],
                # multi-turn: every completion token is attended to, the loss mask has holes
                attention_mask=None if rollout.env_mask is None else completion_mask,
            )
        )
    return batches


def reduce_means(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over processes (one collective)."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean").tolist()
    return dict(zip(keys, values))


class SampleLog:
    """The samples table of an online RL run (logging.samples_every, logging.samples_count):
    at the first rollout, then at the first rollout at least `every` steps after the last
    table, this process's first `count` completions with prompt, total and per-function
    rewards, length and truncation. The loop logs rank 0's rows (train/logging.py)."""

    def __init__(self, every: int, count: int):
        self.every, self.count = every, count
        self.last_step: int | None = None
        self.pending: list[dict] = []

    def due(self, step: int) -> bool:
        return self.every > 0 and (self.last_step is None or step - self.last_step >= self.every)

    def record(self, step: int, prompts: list, rollout: RolloutBatch, scored) -> None:
        """`step`: the optimizer step this rollout trains (1-based, as in metrics.jsonl);
        `prompts`: the prompt of each of the rollout's rows."""
        if not self.due(step):
            return
        self.last_step = step
        rows = []
        for i in range(min(self.count, len(rollout))):
            row = {
                "prompt": _prompt_text(prompts[i]),
                "completion": rollout.texts[i],
                "reward": float(scored.rewards[i]),
            }
            row.update({f"reward/{k}": float(v[i]) for k, v in scored.per_function.items()})
            row.update(length=int(rollout.lengths[i]), truncated=bool(rollout.truncated[i]))
            rows.append(row)
        self.pending = rows

    def pop(self) -> list[dict]:
        rows, self.pending = self.pending, []
        return rows


def _prompt_text(prompt) -> str:
    """A chat prompt as its last message's text (the question); plain text as is."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)
