"""Reward models from preference pairs: Bradley–Terry math, scoring rule, trainer, evaluation.

Nothing heavy is imported here; import the submodules (``bradley_terry``, ``scoring``, ``trainer``,
``evaluate``, ``data``) or the names below lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RewardModelTrainer", "PreferenceRows", "PreferencePairs", "tokenize_pairs", "bradley_terry_loss"]


def __getattr__(name: str) -> Any:
    if name == "RewardModelTrainer":
        from rlhf_cli.reward_model.trainer import RewardModelTrainer

        return RewardModelTrainer
    if name == "bradley_terry_loss":
        from rlhf_cli.reward_model.bradley_terry import bradley_terry_loss

        return bradley_terry_loss
    if name == "tokenize_pairs":
        from rlhf_cli.reward_model.data import tokenize_pairs

        return tokenize_pairs
    if name in ("PreferenceRows", "PreferencePairs"):
        from rlhf_cli.data import preferences

        return getattr(preferences, name)
    raise AttributeError(name)
