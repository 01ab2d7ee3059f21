"""PPO: configuration, pure math, KL controllers and the trainer."""

from rlhf_cli.ppo.config import PPOConfig
from rlhf_cli.ppo.trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
