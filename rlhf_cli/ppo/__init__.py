"""PPO: configuration, pure math, KL controllers and the trainer.

``PPOConfig`` and ``PPOTrainer`` are imported lazily: the command line's schema
(``rlhf_cli.config.schema``) derives its ppo group from ``rlhf_cli.ppo.config`` and must not pay
for importing torch through the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"PPOConfig": "rlhf_cli.ppo.config", "PPOTrainer": "rlhf_cli.ppo.trainer"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_cli.ppo' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
