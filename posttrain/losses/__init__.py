"""Pure loss functions (torch only): tensors in, `LossOutput(total, units, metrics)` out.

The maths is the algorithm reference (spec §3-§11); every module cites its paper and equation.
"""

from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    reinforce_pp_advantages,
    rloo_advantages,
)
from posttrain.losses.common import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
)
from posttrain.losses.dpo import (
    DPO_LOSSES,
    PreferenceLogps,
    cdpo_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)
from posttrain.losses.grpo import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_policy_loss,
    k3_kl,
    overlong_penalty,
)
from posttrain.losses.gspo import cispo_loss, gspo_loss, gspo_token_loss
from posttrain.losses.kimi import kimi_length_penalty, kimi_loss
from posttrain.losses.kto import kto_loss
from posttrain.losses.moe import (
    aux_free_bias_update,
    expert_load,
    load_balancing_loss,
    load_stats,
    router_entropy,
    router_z_loss,
)
from posttrain.losses.mtp import (
    greedy_accept,
    greedy_accept_rows,
    mtp_labels,
    mtp_loss,
    speculative_accept,
    speculative_accept_rows,
)
from posttrain.losses.orpo import odds_ratio_loss
from posttrain.losses.policy import CLIP_DEFAULTS, POLICY_LOSSES
from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from posttrain.losses.reward import bradley_terry_loss
from posttrain.losses.rollout_correction import ROLLOUT_CORRECTIONS
from posttrain.losses.sft import cross_entropy_loss
from posttrain.losses.types import LossOutput

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "cdpo_loss",
    "orpo_loss",
    "cispo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "kto_loss",
    "odds_ratio_loss",
    "CLIP_DEFAULTS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "DPO_LOSSES",
    "GRPO_LOSS_TYPES",
    "AdaptiveKLController",
    "FixedKLController",
    "LossOutput",
    "PreferenceLogps",
    "aux_free_bias_update",
    "bradley_terry_loss",
    "cross_entropy_loss",
    "entropy_from_logits",
    "expert_load",
    "gae",
    "greedy_accept",
    "greedy_accept_rows",
    "group_advantages",
    "grpo_policy_loss",
    "hinge_loss",
    "ipo_loss",
    "k3_kl",
    "kimi_length_penalty",
    "kimi_loss",
    "kl_penalized_rewards",
    "load_balancing_loss",
    "load_stats",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mtp_labels",
    "mtp_loss",
    "overlong_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "robust_loss",
    "router_entropy",
    "router_z_loss",
    "selective_log_softmax",
    "sigmoid_loss",
    "simpo_loss",
    "speculative_accept",
    "speculative_accept_rows",
]
