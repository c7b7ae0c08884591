"""Algorithms, each a recipe dataclass plus an `Algorithm` for the shared loop.

ALGORITHMS maps a CLI command to (recipe class, algorithm class).
"""

from posttrain.algorithms.dpo import DPO, DPORecipe
from posttrain.algorithms.grpo import GRPO, GRPORecipe
from posttrain.algorithms.kimi import Kimi, KimiRecipe
from posttrain.algorithms.kto import KTO, KTORecipe
from posttrain.algorithms.ppo import PPO, PPORecipe
from posttrain.algorithms.reward_model import RewardModel, RMRecipe
from posttrain.algorithms.sft import SFT, SFTRecipe

ALGORITHMS = {
    "sft": (SFTRecipe, SFT),
    "rm": (RMRecipe, RewardModel),
    "dpo": (DPORecipe, DPO),
    "kto": (KTORecipe, KTO),
    "grpo": (GRPORecipe, GRPO),
    "kimi": (KimiRecipe, Kimi),
    "ppo": (PPORecipe, PPO),
}
