"""rlhf_cli: fine-tune transformer language models with PPO.

The public names are legacy TRL's PPO surface, so ``from trl import PPOTrainer`` becomes
``from rlhf_cli import PPOTrainer``. They are imported lazily: ``rlhf --help`` and
``python -m rlhf_cli`` must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PPOTrainer": "rlhf_cli.trl.trainer",
    "PPOConfig": "rlhf_cli.trl.config",
    "AutoModelForCausalLMWithValueHead": "rlhf_cli.models",
    "AutoModelForSeq2SeqLMWithValueHead": "rlhf_cli.models",
    "PreTrainedModelWrapper": "rlhf_cli.models",
    "create_reference_model": "rlhf_cli.models",
    "set_seed": "rlhf_cli.seeding",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_cli' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
