"""Typed configuration: nested dataclasses, YAML recipes, dotted `key=value` overrides.

A recipe's keys are exactly the dataclass fields. Unknown keys and wrong types are errors that
name the key (with its dotted path) and suggest the nearest valid one. Every numeric field
declares its valid range in its annotation (`Range`, or an alias such as `PositiveInt`), checked
here when a value is read; `check_recipe` adds the rules that tie fields together. The resolved
config is written next to every run as `config.yaml`. Section classes shared by all trainers live here;
each algorithm adds its own section (see `posttrain/algorithms/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from posttrain.config_schema import AnyFloat as AnyFloat
from posttrain.config_schema import ConfigError as ConfigError
from posttrain.config_schema import Fraction as Fraction
from posttrain.config_schema import NonNegativeFloat as NonNegativeFloat
from posttrain.config_schema import NonNegativeInt as NonNegativeInt
from posttrain.config_schema import PositiveFloat as PositiveFloat
from posttrain.config_schema import PositiveInt as PositiveInt
from posttrain.config_schema import Range as Range
from posttrain.config_schema import check_moved_keys as check_moved_keys
from posttrain.config_schema import from_dict as from_dict
from posttrain.config_schema import reject_unused as reject_unused
from posttrain.config_schema import to_dict as to_dict

# --------------------------------------------------------------------------------------------
# Sections shared by every trainer
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    r: NonNegativeInt = 0
    """LoRA rank; 0 disables LoRA (full fine-tuning)."""
    alpha: PositiveFloat = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear" for every linear layer of the blocks."""
    load_in_4bit: bool = False
    """QLoRA: load the base model in 4-bit with bitsandbytes (CUDA only)."""


@dataclass
class MoEConfig:
    """Router training of mixture-of-experts models (spec §10; no-op for dense models)."""

    aux_loss_coef: NonNegativeFloat = 0.001
    """Load-balancing loss weight (Switch); 0.001 is transformers' Qwen-MoE/Mixtral default."""
    aux_loss_impl: Literal["model", "posttrain"] = "model"
    """'model': the architecture's own load_balancing_loss_func; 'posttrain': losses/moe.py."""
    z_loss_coef: NonNegativeFloat = 0.0
    """Router z-loss weight (ST-MoE), mean over tokens of logsumexp(router logits)^2."""
    freeze_router: bool = False
    """Keep the router (gate) weights fixed: requires_grad=False on load."""
    aux_free_bias_gamma: NonNegativeFloat = 0.0
    """DeepSeek-V3 aux-loss-free balancing: per-expert selection-bias step; 0 disables it."""


@dataclass
class MTPConfig:
    kind: Literal["none", "deepseek", "medusa"] = "none"
    """Multi-token prediction heads (spec section 11): none, DeepSeek-V3 modules or Medusa heads."""
    depth: PositiveInt = 2
    """K, the number of extra heads; head k predicts the token k+1 positions ahead."""
    weight: NonNegativeFloat = 0.3
    """lambda: L = CE + (lambda / K) * sum_k CE_k."""
    freeze_base: bool = False
    """Train only the heads (the base model's parameters get no gradient)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model directory or hub id (required)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the stored master weights; mixed precision is set by train.mixed_precision."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off unless you trust the source."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to from_pretrained."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings (off when r=0)."""
    mtp: MTPConfig = field(default_factory=MTPConfig)
    """Multi-token prediction heads, saved beside the checkpoint (off when kind=none)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts router losses and balancing (ignored for dense models)."""
    logit_chunk_tokens: Annotated[int, Range(ge=-1)] = -1
    """Tokens per chunk of the LM head in loss and log-prob passes, so the full (batch, length,
    vocab) logits never exist: 0 off, -1 auto (256 when vocab >= 32,768, else off)."""


@dataclass
class DataSource:
    """One part of a training mixture (data.train_path as a list)."""

    path: str = ""
    """A file, glob, dataset directory or hub id, as data.train_path."""
    weight: PositiveFloat = 1.0
    """Share of the mixture; weights are normalised over the sources."""
    split: str = ""
    """This source's split ("": data.train_split)."""
    subset: str = ""
    """This source's dataset config name ("": data.subset)."""


@dataclass
class DataConfig:
    train_path: str | list[DataSource] = ""
    """Training data: a .jsonl/.json/.parquet/.csv file (also .gz/.bz2/.xz), a glob, a dataset
    directory (hub-style split files or save_to_disk) or a hub id; or a list of {path, weight}
    mixed by datasets.interleave_datasets (seeded by train.seed, stops at the first exhausted)."""
    train_split: str = ""
    """Split read for training ("": "train", or the only split there is)."""
    eval_path: str = ""
    """Optional held-out data in the same format, for eval loss."""
    eval_split: str = ""
    """Split read for eval ("": test/validation/valid/eval/dev if present, else the only one).
    Set without eval_path, it names a split of data.train_path."""
    subset: str = ""
    """Dataset config name (hub ids and directories whose README.md lists configs)."""
    num_proc: PositiveInt = 1
    """Processes that tokenise the data (datasets.map num_proc), on the main process only."""
    cache: bool = True
    """Reuse tokenised data from the datasets cache, keyed by the rows, the tokenizer and the
    data settings that change tokens; off: tokenise in memory on every run."""
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    """Row format; auto picks from the columns present."""
    max_length: Annotated[int, Range(ge=2)] = 512
    """Tokens per example; longer examples are truncated and counted."""
    truncation_side: Literal["right", "left"] = "right"
    """sft: which end of an over-long example is cut (left keeps the final turns)."""
    packing: bool = False
    """Padding-free rows. sft: examples concatenated with per-example position_ids. rm, dpo:
    each pair laid out once with its prompt shared by both answers (a 4-D mask; a model it
    cannot reproduce, e.g. flash-attention, trains padded with a start-up note)."""
    max_eval_examples: PositiveInt = 512
    """Cap on eval rows used for eval loss."""


@dataclass
class OptimConfig:
    lr: PositiveFloat = 1e-4
    """Peak learning rate."""
    weight_decay: NonNegativeFloat = 0.0
    """Decoupled (AdamW) weight decay for weight matrices; biases and norms never decay."""
    decay_embeddings: bool = False
    """Also apply weight decay to embedding matrices."""
    betas: list[Annotated[float, Range(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    eps: PositiveFloat = 1e-8
    """Adam epsilon."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up steps (optimizer steps)."""
    max_grad_norm: NonNegativeFloat = 1.0
    """Clip gradients to this global norm; 0 disables clipping."""
    fused: bool = True
    """Use the fused/foreach AdamW kernel where the device supports it."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl, config.yaml and final/ are written."""
    seed: NonNegativeInt = 0
    """Seed for initialisation, data order and sampling."""
    max_steps: PositiveInt = 100
    """Optimizer steps to run."""
    batch_size: PositiveInt = 8
    """Examples per micro-batch per process."""
    grad_accum: PositiveInt = 1
    """Micro-batches accumulated per optimizer step."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype through Accelerate; fp16 uses dynamic loss scaling (CUDA only)."""
    save_every: NonNegativeInt = 0
    """Checkpoint every N optimizer steps; 0 saves only at the end."""
    keep_checkpoints: PositiveInt = 2
    """How many recent checkpoints to keep."""
    eval_every: NonNegativeInt = 0
    """Evaluate every N steps (0: only at the end when eval data is given)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir."""
    num_threads: NonNegativeInt = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""
    sharding: Literal["auto", "none", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"] = "auto"
    """Parameter/gradient/optimizer sharding: auto follows the `accelerate launch` config; fsdp2
    also works under torchrun on CPU; deepspeed_* need CUDA and the deepspeed extra."""
    cpu_offload: bool = False
    """Keep sharded parameters and optimizer state in CPU memory (fsdp2 or DeepSpeed only)."""
    save_hf_checkpoints: bool = False
    """Also write each checkpoint's model in Hugging Face format (checkpoints/step-N/hf/)."""
    push_to_hub: bool = False
    """Upload final/ to the Hugging Face Hub as hub_model_id when training ends."""
    hub_model_id: str = ""
    """Hub repository 'user/name' for push_to_hub (checked with the network before training)."""
    hub_private: bool = True
    """Create the Hub repository private (push_to_hub); false makes a new one public."""


@dataclass
class LoggingConfig:
    log_every: PositiveInt = 10
    """Write metrics every N optimizer steps."""
    progress: bool = True
    """Show a rich progress bar on rank 0."""
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=lambda: ["jsonl"]
    )
    """Where metrics go: output_dir/metrics.jsonl always, plus Accelerate's trackers listed here
    (each needs its extra, e.g. pip install 'posttrain[wandb]'; WANDB_MODE=offline honoured;
    MLflow writes output_dir/mlflow.db unless MLFLOW_TRACKING_URI is set)."""
    project: str = "posttrain"
    """Tracker project (W&B project, MLflow experiment, trackio project, TensorBoard subdir)."""
    run_name: str = ""
    """Tracker run name; empty: the output directory's name."""
    samples_every: NonNegativeInt = 10
    """Online RL: log a table of sample completions with their rewards to samples.jsonl and the
    trackers at the first rollout and then at least every N steps (0: never)."""
    samples_count: PositiveInt = 8
    """Online RL: completions per samples table (rank 0's first ones of the rollout)."""
    tensorboard: bool = False
    """Older spelling of report_to: [jsonl, tensorboard]; true adds tensorboard to report_to."""


@dataclass
class RewardFunctionConfig:
    name: str = "accuracy"
    """A built-in reward (accuracy, format, kimi_length, overlong, digit_overlap, code_output,
    reward_model) or `module:function` for user code."""
    weight: AnyFloat = 1.0
    """Weight of this function in the summed reward."""
    params: dict = field(default_factory=dict)
    """Keyword arguments for the function's factory (e.g. path for reward_model)."""


@dataclass
class EvaluationConfig:
    """Generation-based evaluation during training (every train.eval_every steps and at the
    end) on the prompts of data.eval_path, besides the algorithm's own eval (posttrain/evaluation.py)."""

    metric: Literal["default", "exact_match", "reward"] = "default"
    """default: only the algorithm's own eval; exact_match: greedy answers vs the 'answer'
    column (eval/accuracy); reward: greedy completions scored by `rewards` (eval/reward)."""
    rewards: list[RewardFunctionConfig] = field(default_factory=list)
    """Reward functions of metric reward (built-in names or module:function), weighted."""
    match: Literal["answer", "exact"] = "answer"
    """exact_match rule: answer = extracted final answer (tags, boxed, last number) equals the
    reference, numerically when both are numbers; exact = whole completion equals it."""
    max_new_tokens: PositiveInt = 32
    """Generation budget per eval prompt."""
    samples: PositiveInt = 1
    """K > 1 adds pass@K and the mean over K samples at temperature 1 per prompt."""
    success_threshold: AnyFloat = 1.0
    """metric reward with samples > 1: a sample counts for pass@K when its reward is >= this."""


@dataclass
class BaseRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, batching, precision and checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress output."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Generation-based evaluation with your reward or exact match (off by default)."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 3e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`:LINE:COL: not valid YAML: problem (context)` on one line (PyYAML's own text spreads the
    position over several lines, after the message)."""
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def check_recipe(cfg: Any) -> None:
    """Rules that tie fields together (each field's own range is checked by from_dict).

    Sections are found by name, so one function covers every trainer's recipe; rules that
    depend on the number of processes stay with the algorithm (they are known only at launch)."""
    betas = cfg.optim.betas
    if len(betas) != 2:
        raise ConfigError(f"optim.betas={betas!r} must hold exactly two numbers (beta1, beta2)")
    micro, accum = cfg.train.batch_size, cfg.train.grad_accum
    kimi = getattr(cfg, "kimi", None)
    if kimi is not None and micro % kimi.num_generations:
        raise ConfigError(
            f"train.batch_size={micro} must be a multiple of kimi.num_generations="
            f"{kimi.num_generations} (each Kimi micro-batch holds whole groups)"
        )
    ppo = getattr(cfg, "ppo", None)
    if ppo is not None:
        rows = ppo.prompts_per_rollout * ppo.samples_per_prompt
        if rows % (micro * accum):
            raise ConfigError(
                f"ppo.prompts_per_rollout × ppo.samples_per_prompt = {rows} sequences per rollout "
                f"must be a multiple of the minibatch train.batch_size × train.grad_accum = "
                f"{micro} × {accum}"
            )


def load_recipe(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read a YAML recipe, apply dotted overrides, build the typed config and check it."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        cfg = from_dict(cls, data)
        check_recipe(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
