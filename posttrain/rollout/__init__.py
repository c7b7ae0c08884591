"""Rollouts: batched sampling with a shared-prefix KV cache, and teacher-forced log-probs.

`RolloutEngine.generate(prompts, SamplingParams(...)) -> RolloutBatch` is the only way the
online trainers and `posttrain eval` sample; `sequence_logprobs` recomputes the log-probs of
those samples (π_old, π_ref, π_θ) with the same masks and positions.
"""

from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.logprobs import sequence_logprobs
from posttrain.rollout.types import RolloutBatch, SamplingParams

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingParams", "sequence_logprobs"]
