"""Model FLOPs utilisation: achieved training FLOP/s over the measured matmul peak.

Training FLOPs follow the usual estimate (Kaplan et al. 2020, appendix; PaLM, appendix B):
6·N per trained token for the matmul weights (forward 2N, backward 4N), plus causal attention.
N counts the weights that take part in matmuls: every linear layer of the blocks, and the LM
head for causal LMs (tied to the embedding here; the embedding lookup itself is free). A causal
sequence of length n costs 2·d·n² FLOPs per layer forward for QKᵀ and AV (half of the n² score
matrix is masked), so 6·L·d·n² for forward and backward. Per step we know the tokens, not each
sequence's length, so Σn² ≈ tokens · E[n²]/E[n] over the fixture rows. Padding is not counted:
it is work done, not work needed. DPO adds the frozen reference forward: 2·N per token plus a
third of the attention.

Hardware MFU (`hw_flops`, the `hw_mfu_*` fields of a record) counts instead the token positions
each side's model really computed, padding included and a shared prompt once, as
bench/positions.py logs them per forward: 6·N per position under autograd, 2·N for forwards
without (DPO's reference), and the attention term over each row's real width. It divides by the
bf16 peak for both sides, so it reads "% of measured bf16 matmul peak", whatever the dtype a
side picked.

The peak is measured here, not taken from a data sheet: the best of a few large square
torch.matmul calls in fp32 and in bf16, with the benchmark's thread count. On CPUs with AMX
the bf16 peak is several times the fp32 one, so each side's MFU divides by the peak of the dtype
its matmuls run in (bf16 under autocast, else fp32).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PEAK_SIZE = 2048


def measure_peak(
    dtype: str, threads: int = 2, size: int = PEAK_SIZE, repeats: int = 5, device: str = "cpu"
) -> float:
    """Best observed FLOP/s of a (size x size) @ (size x size) matmul in `dtype`."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, dtype=dt, device=device)
    b = torch.randn(size, size, dtype=dt, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up the kernel
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def matmul_params(model_dir: Path, lm_head: bool = True) -> tuple[int, int, int]:
    """(N matmul weights, layers, attention width) from a Llama/Qwen-style config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    d, layers = c["hidden_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o, k, v
    mlp = 3 * d * c["intermediate_size"]  # gate, up, down
    n = layers * (attention + mlp) + (c["vocab_size"] * d if lm_head else 0)
    return n, layers, heads * head_dim


def step_flops(
    case: str, model_dir: Path, tokens: float, mean_len: float, mean_sq_len: float
) -> float:
    """Training FLOPs of one optimizer step that trains `tokens` non-pad tokens."""
    n, layers, width = matmul_params(model_dir, lm_head=case != "rm")
    sum_sq = tokens * mean_sq_len / mean_len  # Σ n² over the step's sequences
    flops = 6 * n * tokens + 6 * layers * width * sum_sq
    if case == "dpo":  # the reference model's forward pass
        flops += 2 * n * tokens + 2 * layers * width * sum_sq
    return flops


def vocab_size(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def hw_flops(case: str, model_dir: Path, counted: dict) -> float:
    """FLOPs of the forwards bench/positions.py counted: {train,nograd}_{positions,sum_sq}."""
    n, layers, width = matmul_params(model_dir, lm_head=case != "rm")
    train = 6 * n * counted["train_positions"] + 6 * layers * width * counted["train_sum_sq"]
    nograd = 2 * n * counted["nograd_positions"] + 2 * layers * width * counted["nograd_sum_sq"]
    return float(train + nograd)


if __name__ == "__main__":
    for dtype in ("fp32", "bf16"):
        print(f"{dtype}: {measure_peak(dtype) / 1e9:.1f} GFLOP/s")
