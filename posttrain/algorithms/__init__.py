"""Algorithms, each a recipe dataclass plus an `Algorithm` for the shared loop.

ALGORITHMS maps a CLI command to (recipe class, algorithm class).
"""

from posttrain.algorithms.sft import SFT, SFTRecipe

ALGORITHMS = {
    "sft": (SFTRecipe, SFT),
}
