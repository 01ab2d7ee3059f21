"""The registry of advantage estimators (DESIGN §11.6): ``ppo.advantage_estimator`` names one entry.

Torch-free on purpose: the command line's schema and :class:`~rlhf_cli.ppo.config.PPOConfig` read the
names and what each estimator needs (a critic, groups of responses) without importing torch; the math
is in :mod:`rlhf_cli.ppo.advantages`, found on first use. A new estimator is one function there and
one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from torch import Tensor

    from rlhf_cli.ppo.advantages import EstimatorSettings
    from rlhf_cli.ppo.functional import Advantages


@dataclass(frozen=True)
class AdvantageEstimator:
    """One entry of the registry: what the estimator needs, and its function in ``ppo.advantages``."""

    name: str
    function: str  # name of its function in rlhf_cli.ppo.advantages
    needs_critic: bool  # runs and trains the value head
    min_group_size: int  # smallest samples_per_prompt it can work with
    summary: str  # one line for documentation and error messages

    @property
    def estimate(self) -> Callable[["Tensor", Optional["Tensor"], "Tensor", "EstimatorSettings"], "Advantages"]:
        """(rewards [B, T], values [B, T] or None, mask [B, T], settings) -> Advantages [B, T]."""
        from rlhf_cli.ppo import advantages

        return getattr(advantages, self.function)


_REGISTRY = (
    AdvantageEstimator("gae", "gae_advantages", needs_critic=True, min_group_size=1,
                       summary="PPO: generalised advantage estimation with a value head (TRL's)"),
    AdvantageEstimator("grpo", "grpo_advantages", needs_critic=False, min_group_size=2,
                       summary="GRPO: reward minus its group's mean, over the group's std"),
    AdvantageEstimator("rloo", "rloo_advantages", needs_critic=False, min_group_size=2,
                       summary="RLOO: reward minus the mean reward of the group's other responses"),
    AdvantageEstimator("reinforce_pp", "reinforce_pp_advantages", needs_critic=False, min_group_size=1,
                       summary="REINFORCE++: discounted per-token returns whitened over the batch"),
)
ESTIMATORS: dict[str, AdvantageEstimator] = {e.name: e for e in _REGISTRY}
# The names ppo.advantage_estimator takes (the one declaration; PPOConfig and the schema import it).
ADVANTAGE_ESTIMATORS = tuple(ESTIMATORS)


def estimator_named(name: str) -> AdvantageEstimator:
    """The registry entry called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"Unknown advantage estimator {name!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}.") from None


def estimators_without_groups() -> list[str]:
    """Estimators that work with one response per prompt."""
    return [e.name for e in _REGISTRY if e.min_group_size <= 1]
