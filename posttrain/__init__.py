"""posttrain: LLM post-training (SFT, reward models, DPO, PPO, GRPO, Kimi k1.5) on one loop.

The Python API (posttrain/api.py):

    from posttrain import SFTTrainer, load_recipe
    result = SFTTrainer("recipes/sft_tiny.yaml", overrides=["train.max_steps=10"]).train()

Names are resolved on first use (PEP 562), so `import posttrain` loads neither torch nor
transformers: the CLI's light commands (`--help`, `config keys`) stay fast.
"""

__version__ = "0.1.0"

_API = (
    "SFTTrainer",
    "RewardTrainer",
    "DPOTrainer",
    "KTOTrainer",
    "GRPOTrainer",
    "KimiTrainer",
    "PPOTrainer",
    "Trainer",
    "load_recipe",
)
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from posttrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
