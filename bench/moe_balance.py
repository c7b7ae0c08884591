"""`python -m bench.moe_balance [--steps 150] [--coef 0.1]`: does the load-balancing loss
balance the experts? (acceptance check for model.moe, spec §10)

Trains the same tiny Qwen3-MoE (4 experts, top-2) with SFT on the bundled arithmetic task twice,
same seed, data and steps, once with `model.moe.aux_loss_coef = COEF` and once with 0, and prints
the coefficient of variation of the per-expert token fractions (std / mean over experts, per
layer, averaged over layers; 0 = perfectly balanced):
- `train_cv`: the loop's `moe/load_cv` averaged over the last quarter of the logged steps;
- `heldout_cv`: the final model routing 256 held-out examples (sft_test.jsonl).
Lower is more balanced. Runs on CPU in a couple of minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from posttrain.algorithms.sft import SFT, SFTRecipe, encode_sft_file
from posttrain.config import MoEConfig, load_recipe
from posttrain.data.arithmetic import make_arithmetic
from posttrain.data.collate import pad_collate
from posttrain.losses.types import LossOutput
from posttrain.models.loading import load_tokenizer
from posttrain.models.moe import MoEObjective
from posttrain.models.presets import init_model
from posttrain.train.loop import train

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sft_tiny_moe.yaml"


def run(model_dir: Path, data_dir: Path, out: Path, coef: float, args) -> dict:
    overrides = {
        "model.name_or_path": model_dir,
        "model.moe.aux_loss_coef": coef,
        "model.moe.z_loss_coef": 0.0,
        "data.train_path": data_dir / "sft_train.jsonl",
        "data.eval_path": "",
        "train.output_dir": out,
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.save_every": 0,
        "train.eval_every": 0,
        "optim.lr": args.lr,
        "optim.warmup_steps": 10,
        "logging.log_every": 1,
        "logging.progress": False,
    }
    cfg = load_recipe(SFTRecipe, RECIPE, [f"{k}={v}" for k, v in overrides.items()])
    result = train(cfg, SFT(cfg))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = records[-max(len(records) // 4, 1) :]
    return {
        "aux_loss_coef": coef,
        "train_cv": sum(r["moe/load_cv"] for r in tail) / len(tail),
        "heldout_cv": heldout_cv(result.final_dir, data_dir),
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "aux_loss": sum(r["moe/aux_loss"] for r in tail) / len(tail),
        "seconds": round(result.seconds, 1),
    }


@torch.no_grad()
def heldout_cv(model_dir: Path, data_dir: Path, examples: int = 256) -> float:
    """Load CV of the trained model on held-out rows, with the same hooks as training."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(str(model_dir))
    data = encode_sft_file(tokenizer, str(data_dir / "sft_test.jsonl"), "auto", 64, examples)
    moe = MoEObjective.build([model], MoEConfig(aux_loss_coef=0.0))
    cvs = []
    for start in range(0, len(data.examples), 64):
        batch = pad_collate(data.examples[start : start + 64], tokenizer.pad_token_id)
        with torch.enable_grad(), moe.capture():  # capture counts grad-enabled forwards only
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        empty = LossOutput(torch.tensor(0.0), torch.tensor(1.0), {})
        cvs.append(float(moe.add_to_loss(empty, 1.0).metrics["moe/load_cv"]))
    moe.close()
    return sum(cvs) / len(cvs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--coef", type=float, default=0.1, help="aux_loss_coef of the balanced run")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moe_balance_"))
    model_dir = init_model(work / "tiny-moe", "tiny", arch="qwen3_moe")
    data_dir = work / "data"
    make_arithmetic(data_dir, n=2000, n_test=256, seed=0)
    rows = [run(model_dir, data_dir, work / f"coef{c}", c, args) for c in (args.coef, 0.0)]
    print(
        f"{'aux_loss_coef':>14} {'train_cv':>9} {'heldout_cv':>10} {'loss':>7} {'aux':>6} {'s':>6}"
    )
    for r in rows:
        print(
            f"{r['aux_loss_coef']:>14g} {r['train_cv']:>9.4f} {r['heldout_cv']:>10.4f} "
            f"{r['final_loss']:>7.4f} {r['aux_loss']:>6.3f} {r['seconds']:>6}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
