"""How good a model is on held-out rows: `posttrain eval` and the recipe's `evaluation` section.

Metrics:
- `exact_match`: the greedy completion against the row's answer. Match rule `answer` (the
  default): the completion's final answer (the last `<answer>…</answer>`, else the last
  `\\boxed{…}`, else the last number in the text; scoring/answers.py) equals the reference,
  numerically with tolerance when both read as numbers ("1,000" = "1000.0", "3/4" = "0.75"),
  else as normalised text (case, spaces, `$…$`, `\\text{}` ignored). Rule `exact`: the whole
  completion, outer whitespace stripped, is the reference string.
- `reward`: greedy completions scored by reward functions (built-in names or `module:function`,
  the same Scorer and call convention as GRPO), the mean weighted reward and each function's mean.
- `loss`: mean token negative log-likelihood (and perplexity) of the completion / assistant tokens
  of SFT rows (messages, prompt/completion or text), the tokens SFT trains on.

With samples=K > 1 (exact_match, reward) each prompt also gets K samples at temperature 1:
pass@K is the fraction of prompts with at least one success (a right answer; a reward at least
`success_threshold`), `sample_*` the mean over all samples.

Rows for exact_match and reward: `prompt` + `answer` (rl_*.jsonl); `prompt` + `completion` (the
completion is the reference); `messages` (the prompt is the chat before the last assistant
message, the reference that message's content). Every other column reaches the reward functions.
Generation goes through the shared RolloutEngine.
"""

from __future__ import annotations

import math
import time

import torch

from posttrain.config import ConfigError, EvaluationConfig, ModelConfig, RewardFunctionConfig
from posttrain.data.collate import pad_collate
from posttrain.data.encoding import detect_format, encode_sft_examples
from posttrain.data.loading import DataError, load_rows
from posttrain.losses.sft import cross_entropy_loss
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.models.sharding import full_parameters
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.scoring import RewardSpec, Scorer
from posttrain.scoring.answers import is_correct

METRICS = ("exact_match", "reward", "loss")


def exact_string_match(completion: str, reference) -> bool:
    """`--match exact`: the completion, outer whitespace stripped, equals the reference."""
    return reference is not None and completion.strip() == str(reference).strip()


MATCHERS = {"answer": is_correct, "exact": exact_string_match}


def _content(message) -> str:
    return message.get("content") or "" if isinstance(message, dict) else str(message)


def prompt_rows(rows, source: str) -> tuple[list, dict[str, list]]:
    """(prompts, other columns) of eval rows; `answer` is derived from a completion or the last
    assistant message when the rows have no such column."""
    names = rows.column_names
    if "prompt" in names:
        columns = {c: rows[c] for c in names if c != "prompt"}
        if "answer" not in columns and "completion" in names:
            columns["answer"] = [
                _content(c[-1]) if isinstance(c, list) else c for c in rows["completion"]
            ]
        return rows["prompt"], columns
    if "messages" in names:
        prompts, answers = [], []
        for i, messages in enumerate(rows["messages"]):
            last = max(
                (j for j, m in enumerate(messages) if m.get("role") == "assistant"), default=0
            )
            if last == 0:
                raise DataError(
                    f"{source}: row {i + 1}: no assistant message after a prompt to evaluate"
                )
            prompts.append(messages[:last])
            answers.append(_content(messages[last]))
        columns = {c: rows[c] for c in names if c != "messages"}
        return prompts, {**columns, "answer": answers}
    raise DataError(
        f"{source}: rows need 'prompt' (with 'answer' or 'completion') or 'messages'; "
        f"got columns {names}"
    )


def _no_answer(source: str, columns: list[str]) -> str:
    return (
        f"{source}: exact_match needs a reference: an 'answer' or 'completion' column, or "
        f"'messages' (found: {', '.join(columns)})"
    )


def build_eval_scorer(rewards: list[RewardFunctionConfig], timeout_s: float = 60.0) -> Scorer:
    specs = [RewardSpec(name=r.name, weight=r.weight, params=dict(r.params)) for r in rewards]
    return Scorer(specs, failure_reward=0.0, timeout_s=timeout_s)


def _score(texts, prompts, columns, lengths, truncated, metric, scorer, match, threshold):
    """(values (N,), successes (N,) bool, per-function values) of N completions."""
    if metric == "exact_match":
        matcher = MATCHERS[match]
        right = torch.tensor([matcher(t, a) for t, a in zip(texts, columns["answer"])])
        return right.float(), right, {}
    result = scorer(
        prompts, texts, completion_lengths=lengths, truncated=truncated, **dict(columns)
    )
    return result.rewards, result.rewards >= threshold, result.per_function


def generation_sums(
    engine: RolloutEngine,
    prompts: list,
    columns: dict[str, list],
    metric: str,
    max_new_tokens: int,
    samples: int = 1,
    seed: int = 0,
    scorer: Scorer | None = None,
    match: str = "answer",
    success_threshold: float = 1.0,
) -> dict[str, float]:
    """Sums over `prompts` (divide by "n" for means; `finish` does): the greedy metric, each
    reward function's, and with samples > 1 pass@K and the per-sample mean (already / K)."""
    key = "accuracy" if metric == "exact_match" else "reward"
    args = (metric, scorer, match, success_threshold)
    greedy = engine.generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    )
    values, _, per_function = _score(
        greedy.texts, prompts, columns, greedy.lengths.tolist(), greedy.truncated.tolist(), *args
    )
    sums = {"n": float(len(prompts)), key: float(values.sum())}
    sums.update({f"rewards/{name}": float(v.sum()) for name, v in per_function.items()})
    if samples > 1:
        sampled = engine.generate(
            prompts,
            SamplingParams(n=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed),
        )
        rows = sampled.group_ids.tolist()  # grouped by prompt: K rows per prompt, in order
        values, success, _ = _score(
            sampled.texts,
            [prompts[g] for g in rows],
            {c: [v[g] for g in rows] for c, v in columns.items()},
            sampled.lengths.tolist(),
            sampled.truncated.tolist(),
            *args,
        )
        sums[f"pass@{samples}"] = float(success.view(len(prompts), samples).any(dim=1).sum())
        sums[f"sample_{key}"] = float(values.sum()) / samples
    return sums


def finish(sums: dict[str, float]) -> dict[str, float]:
    """Means from `generation_sums` (summed over processes or not)."""
    n = sums["n"]
    return {**{k: v / max(n, 1.0) for k, v in sums.items() if k != "n"}, "n": int(n)}


def accuracy_of(
    engine: RolloutEngine,
    prompts: list,
    answers: list,
    max_new_tokens: int,
    samples: int = 1,
    seed: int = 0,
    match: str = "answer",
) -> dict:
    """Greedy exact-match accuracy (and pass@K, sample_accuracy) of prompt/answer pairs."""
    started = time.perf_counter()
    sums = generation_sums(
        engine, prompts, {"answer": list(answers)}, "exact_match", max_new_tokens, samples, seed,
        match=match,
    )  # fmt: skip
    return {**finish(sums), "seconds": time.perf_counter() - started}


@torch.no_grad()
def mean_token_loss(model, tokenizer, rows, source: str, max_length: int, batch_size: int) -> dict:
    """Mean NLL per trained token (completion / assistant tokens) of SFT rows, and perplexity."""
    fmt = detect_format(rows.column_names, source, "auto")
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        for ex in encode_sft_examples(tokenizer, row, fmt, max_length, f"{source}: row {i + 1}"):
            truncated += ex.truncated
            if sum(ex.loss_mask[1:]):
                examples.append(ex)
    if not examples:
        raise DataError(f"{source}: no row has completion tokens within max_length={max_length}")
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = batch.to(device)
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits  # (B, T, V)
        out = cross_entropy_loss(logits, batch.labels)
        total, tokens = total + float(out.total), tokens + int(out.units)
    loss = total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "n": len(rows),
        "truncated": truncated,
    }


def evaluate_model(
    model_dir: str,
    data_path: str,
    max_new_tokens: int = 16,
    samples: int = 1,
    limit: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    *,
    metric: str = "exact_match",
    rewards: list[RewardFunctionConfig] | None = None,
    match: str = "answer",
    success_threshold: float = 1.0,
    max_length: int = 1024,
    batch_size: int = 8,
) -> dict:
    """`posttrain eval`: one metric of a model on a data file (see the module docstring)."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    if metric == "reward" and not rewards:
        raise ConfigError(
            "--metric reward needs at least one --reward (a built-in or module:function)"
        )
    if match not in MATCHERS:
        raise ConfigError(f"--match {match!r}: expected one of {', '.join(MATCHERS)}")
    started = time.perf_counter()
    rows = load_rows(data_path)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    scorer = build_eval_scorer(rewards) if metric == "reward" else None
    if metric != "loss":  # data problems before the (slow) model load
        prompts, columns = prompt_rows(rows, str(data_path))
        if metric == "exact_match" and "answer" not in columns:
            raise DataError(_no_answer(str(data_path), rows.column_names))
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_causal_lm(ModelConfig(name_or_path=model_dir, trust_remote_code=trust_remote_code))
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    head = {"model": str(model_dir), "data": str(data_path), "metric": metric}
    if metric == "loss":
        result = mean_token_loss(model, tokenizer, rows, str(data_path), max_length, batch_size)
    else:
        sums = generation_sums(
            RolloutEngine(model, tokenizer), prompts, columns, metric, max_new_tokens, samples,
            seed, scorer, match, success_threshold,
        )  # fmt: skip
        result = finish(sums)
    return {**head, **result, "seconds": time.perf_counter() - started}


class PeriodicEvaluation:
    """The recipe's `evaluation` section during training: the eval prompts shared out over
    processes, generated from the policy (gathered once when sharded), summed over processes."""

    def __init__(self, cfg):
        self.cfg: EvaluationConfig = cfg.evaluation
        self.seed = cfg.train.seed
        path = cfg.data.eval_path
        if not path:
            raise ConfigError(f"evaluation.metric={self.cfg.metric} needs data.eval_path")
        rows = load_rows(path)
        rows = rows.select(range(min(cfg.data.max_eval_examples, len(rows))))
        self.prompts, self.columns = prompt_rows(rows, path)
        self.scorer = None
        if self.cfg.metric == "reward":
            if not self.cfg.rewards:
                raise ConfigError("evaluation.metric=reward needs evaluation.rewards")
            self.scorer = build_eval_scorer(self.cfg.rewards)
        elif "answer" not in self.columns:
            raise DataError(_no_answer(path, rows.column_names))
        key = "accuracy" if self.cfg.metric == "exact_match" else "reward"
        self.keys = ["n", key] + [f"rewards/{r.name}" for r in self.cfg.rewards if self.scorer]
        if self.cfg.samples > 1:
            self.keys += [f"pass@{self.cfg.samples}", f"sample_{key}"]

    @torch.no_grad()
    def __call__(self, policy, tokenizer, accelerator) -> dict[str, float]:
        """Metrics (eval/ prefix added by the loop); every process must call this."""
        mine = list(range(accelerator.process_index, len(self.prompts), accelerator.num_processes))
        was_training = policy.training
        policy.eval()
        with full_parameters(policy):  # a collective: then each rank generates on its own
            sums = {}
            if mine:
                sums = generation_sums(
                    RolloutEngine(policy, tokenizer),
                    [self.prompts[i] for i in mine],
                    {c: [v[i] for i in mine] for c, v in self.columns.items()},
                    self.cfg.metric, self.cfg.max_new_tokens, self.cfg.samples, self.seed,
                    self.scorer, self.cfg.match, self.cfg.success_threshold,
                )  # fmt: skip
        policy.train(was_training)
        local = torch.tensor([sums.get(k, 0.0) for k in self.keys], dtype=torch.float64)
        total = accelerator.reduce(local.to(accelerator.device), reduction="sum").tolist()
        result = finish(dict(zip(self.keys, total)))
        result.pop("n")
        return result


def build_periodic_eval(cfg, algorithm: str) -> PeriodicEvaluation | None:
    """The training-time evaluator of a recipe, or None when `evaluation.metric` is default."""
    if cfg.evaluation.metric == "default":
        return None
    if algorithm == "rm":
        raise ConfigError("rm: evaluation.metric is not used (a reward model does not generate)")
    if getattr(cfg.model, "mtp", None) is not None and cfg.model.mtp.kind != "none":
        raise ConfigError("evaluation.metric with model.mtp: evaluate final/ with `posttrain eval`")
    return PeriodicEvaluation(cfg)
