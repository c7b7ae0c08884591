"""Count the token positions a process's model actually computes, for the hardware MFU.

    BENCH_POSITIONS=out.json BENCH_VOCAB=2048 python -m bench.positions posttrain sft RECIPE ...

A global forward pre-hook on `nn.Embedding` sees the (rows, width) `input_ids` of every forward
of the model (the input embedding runs once per forward, whatever the model class, and gets the
padded or packed tensor the model really computes on, padding included). Each forward is logged
as (grad enabled, rows, width): a forward under autograd is a training forward (6·N per
position), one without is a reference / old-policy / generation forward (2·N). The same hook runs
inside bench/trl_runner.py, so both sides are counted the same way. Only embeddings with
`BENCH_VOCAB` rows count, so MTP heads or value heads with their own tables are not mistaken for
the model.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys


class PositionCounter:
    """Collects (grad, rows, width) per forward of the model's input embedding."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.forwards: list[tuple[bool, int, int]] = []

    def hook(self, module, args):
        import torch

        if not isinstance(module, torch.nn.Embedding) or module.num_embeddings != self.vocab:
            return None
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self.forwards.append((torch.is_grad_enabled(), ids.shape[0], ids.shape[1]))
        return None

    def install(self) -> PositionCounter:
        from torch.nn.modules.module import register_module_forward_pre_hook

        self.handle = register_module_forward_pre_hook(self.hook)
        return self

    def remove(self) -> None:
        self.handle.remove()

    def summary(self) -> dict:
        """Positions and Σ width² (attention), split into training and no-grad forwards."""
        out = {"train_positions": 0, "train_sum_sq": 0, "nograd_positions": 0, "nograd_sum_sq": 0}
        out["forwards"] = len(self.forwards)
        for grad, rows, width in self.forwards:
            kind = "train" if grad else "nograd"
            out[f"{kind}_positions"] += rows * width
            out[f"{kind}_sum_sq"] += rows * width * width
        return out

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.summary(), f)


def install_from_env() -> PositionCounter | None:
    """Install the hook when BENCH_POSITIONS / BENCH_VOCAB are set; writes the file at exit."""
    path, vocab = os.environ.get("BENCH_POSITIONS"), os.environ.get("BENCH_VOCAB")
    if not path or not vocab:
        return None
    counter = PositionCounter(int(vocab)).install()
    atexit.register(counter.write, path)
    return counter


if __name__ == "__main__":
    install_from_env()
    from bench.gate import install_posttrain_gate

    install_posttrain_gate()  # pauses between pairs' segments when the harness asks (gate.py)
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
