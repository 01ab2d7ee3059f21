"""The names the math answers to, and what each advantage estimator needs: torch-free on purpose.

The command line's schema, the engine's settings and the TRL layer's ``PPOConfig`` read these (to
check a value, or to say which values are valid) without importing torch; the math of
:mod:`rlhf_cli.algo` imports them too, so each enumeration is declared here and only here. An
estimator's function is registered beside its math, in :data:`rlhf_cli.algo.advantages.ESTIMATE`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The per-token KL estimates of the reward-side penalty; "full" needs both models' whole distributions.
KL_PENALTY_MODES = ("kl", "abs", "mse", "full")
# Estimators of KL(π‖π_ref) from sampled tokens for the KL *loss* term (Schulman, "Approximating KL
# Divergence", 2020; see rlhf_cli.algo.kl.kl_loss_terms). k3 is GRPO's.
KL_LOSS_ESTIMATORS = ("k1", "k2", "k3")
# The weights the policy computes with (see rlhf_cli.ppo.precision).
PRECISIONS = ("fp32", "bf16")
# The command line's ppo.precision also takes "auto": bf16 where the device computes bfloat16 natively,
# fp32 elsewhere, resolved once before any model loads (rlhf_cli.ppo.precision.resolve_precision); the
# engine and the run's config.yaml only ever see the resolved value.
AUTO_PRECISION = "auto"
# How the policy is spread over processes (see rlhf_cli.ppo.sharding).
SHARDINGS = ("none", "fsdp2")


@dataclass(frozen=True)
class AdvantageEstimator:
    """What an advantage estimator needs of a run; its math is ``rlhf_cli.algo.advantages.ESTIMATE[name]``."""

    name: str
    needs_critic: bool  # runs and trains the value head
    min_group_size: int  # smallest samples_per_prompt it can work with
    summary: str  # one line for documentation and error messages


_REGISTRY = (
    AdvantageEstimator("gae", needs_critic=True, min_group_size=1,
                       summary="PPO: generalised advantage estimation with a value head (TRL's)"),
    AdvantageEstimator("grpo", needs_critic=False, min_group_size=2,
                       summary="GRPO: reward minus its group's mean, over the group's std"),
    AdvantageEstimator("rloo", needs_critic=False, min_group_size=2,
                       summary="RLOO: reward minus the mean reward of the group's other responses"),
    AdvantageEstimator("reinforce_pp", needs_critic=False, min_group_size=1,
                       summary="REINFORCE++: discounted per-token returns whitened over the batch"),
)
ESTIMATORS: dict[str, AdvantageEstimator] = {e.name: e for e in _REGISTRY}
# The names ppo.advantage_estimator takes.
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
