"""A weighted sum of reward sources."""

from __future__ import annotations

from typing import Sequence

from rlhf_cli.rewards.base import RewardFunction
from rlhf_cli.rewards.scoring import validated_scores


class WeightedSumReward:
    """``sum_k weight_k * score_k`` over ``components`` given as ``(weight, function, name)``.

    Each component's scores are checked on their own (see :mod:`rlhf_cli.rewards.scoring`), so a
    bad component is named in the error rather than the sum.
    """

    def __init__(self, components: list[tuple[float, RewardFunction, str]]) -> None:
        if not components:
            raise ValueError("components must not be empty")
        self.components = [(float(weight), fn, name) for weight, fn, name in components]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        totals = [0.0] * len(prompts)
        for weight, fn, name in self.components:
            scores = validated_scores(fn, prompts, responses, name=f"{name} (in the weighted sum)")
            totals = [total + weight * score for total, score in zip(totals, scores)]
        return totals

    def __repr__(self) -> str:
        terms = " + ".join(f"{weight:g}*{name}" for weight, _, name in self.components)
        return f"weighted_sum({terms})"
