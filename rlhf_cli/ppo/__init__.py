"""PPO: configuration, pure math, KL controllers and the trainer.

``PPOTrainer`` is imported on first use: the command line's schema (``rlhf_cli.config.schema``)
derives its ppo group from ``rlhf_cli.ppo.config`` and must not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from rlhf_cli.ppo.config import PPOConfig

__all__ = ["PPOConfig", "PPOTrainer"]


def __getattr__(name: str) -> Any:
    if name != "PPOTrainer":
        raise AttributeError(f"module 'rlhf_cli.ppo' has no attribute '{name}'")
    from rlhf_cli.ppo.trainer import PPOTrainer

    return PPOTrainer
