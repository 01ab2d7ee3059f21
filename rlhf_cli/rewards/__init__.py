"""Rewards: one protocol (prompts, responses -> one score per sample) and its sources."""

from rlhf_cli.rewards.base import RewardFunction, describe
from rlhf_cli.rewards.classifier import ClassifierReward
from rlhf_cli.rewards.factory import REWARD_TYPES, build_reward
from rlhf_cli.rewards.lexicon import VaderReward
from rlhf_cli.rewards.python_callable import CallableReward, load_callable
from rlhf_cli.rewards.scoring import score_responses
from rlhf_cli.rewards.weighted import WeightedSumReward

__all__ = [
    "REWARD_TYPES",
    "CallableReward",
    "ClassifierReward",
    "RewardFunction",
    "VaderReward",
    "WeightedSumReward",
    "build_reward",
    "describe",
    "load_callable",
    "score_responses",
]
