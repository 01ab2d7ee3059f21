"""A reward model (a run of ``rlhf reward``) in the labelling session: which pairs to show first, and
how often it agrees with the person.

* Uncertainty sampling (``--select uncertain``): candidates are shown in increasing order of
  |p − 0.5|, p = the model's P(a ≻ b) = σ(r(a) − r(b)): the pairs the model cannot yet decide are
  the ones whose label teaches it most. Ties in |p − 0.5| keep the candidates' own order.
* Agreement: after each judgement, the fraction of the person's non-tie judgements where the model
  gave the chosen response p > 0.5, with its binomial standard error √(a(1 − a)/n). At a = 0 or 1 that
  error is 0 whatever n is (3 of 3 is not certainty), so there the 95 % Wilson score interval is shown
  instead: it stays honest at the extremes and for small n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

SELECTIONS = ("order", "uncertain")
_Z95 = 1.959964  # two-sided 95 % normal quantile


def uncertainty_order(probabilities: Sequence[float]) -> list[int]:
    """Indices of the candidates, those with P(a ≻ b) closest to 0.5 first (stable)."""
    return sorted(range(len(probabilities)), key=lambda index: abs(probabilities[index] - 0.5))


def pair_probabilities(reward_model: object, prompts: Sequence[str], responses_a: Sequence[str],
                       responses_b: Sequence[str]) -> list[float]:
    """The reward model's P(a ≻ b) for each candidate (``LearnedReward.preference_probability``)."""
    if not prompts:
        return []
    return list(reward_model.preference_probability(prompts, responses_a, responses_b))  # type: ignore[attr-defined]


@dataclass
class Agreement:
    """The model's agreement with the person's judgements so far (ties excluded: the model always prefers)."""

    # One entry per non-tie judgement, newest last: did the model give the chosen response p > 0.5?
    outcomes: list[bool] = field(default_factory=list)

    def add(self, probability_chosen: float) -> None:
        self.outcomes.append(probability_chosen > 0.5)

    def remove_last(self) -> None:
        self.outcomes.pop()

    @property
    def count(self) -> int:
        return len(self.outcomes)

    @property
    def rate(self) -> float:
        return sum(self.outcomes) / self.count if self.outcomes else float("nan")

    @property
    def standard_error(self) -> float:
        """Binomial standard error √(a(1 − a)/n); nan before any judgement."""
        return math.sqrt(self.rate * (1.0 - self.rate) / self.count) if self.outcomes else float("nan")

    def summary(self) -> str:
        if not self.outcomes:
            return "reward model agreement: no judgements yet (ties do not count)"
        agreed = sum(self.outcomes)
        head = f"reward model agrees with {agreed} of your {self.count} judgements: {100 * self.rate:.0f}%"
        if 0 < agreed < self.count:
            return f"{head} ± {100 * self.standard_error:.0f}% (standard error)"
        low, high = wilson_interval(agreed, self.count)
        return f"{head} (95% Wilson interval {100 * low:.0f}–{100 * high:.0f}%)"


def wilson_interval(successes: int, count: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927): unlike a ± standard error it
    does not shrink to a point when every trial agrees, and it stays inside [0, 1]."""
    rate, z2 = successes / count, z * z
    centre = (rate + z2 / (2 * count)) / (1 + z2 / count)
    half = z * math.sqrt(rate * (1 - rate) / count + z2 / (4 * count * count)) / (1 + z2 / count)
    return max(0.0, centre - half), min(1.0, centre + half)
