"""posttrain: LLM post-training (SFT, reward models, DPO, PPO, GRPO, Kimi k1.5) on one loop."""

__version__ = "0.1.0"
