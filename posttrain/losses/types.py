"""The one return type of every loss in `posttrain.losses`.

A loss returns the SUM of its per-unit losses over one micro-batch and the number of units it
summed over. The training loop adds `total` over micro-batches (and processes) and divides by the
global unit count, so gradient accumulation and data parallelism give exactly the big-batch
loss; `total / units` on a single batch is the paper's formula.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    total: torch.Tensor  # scalar: SUM of per-unit losses over this micro-batch (differentiable)
    units: torch.Tensor  # scalar float: how many units (tokens / sequences / pairs) `total` sums
    metrics: dict[str, torch.Tensor]  # detached scalar tensors (means over this micro-batch)
