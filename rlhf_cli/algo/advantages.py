"""The math of the advantage estimators, registered by function in :data:`ESTIMATE` (what each one
needs, torch-free, is in :mod:`rlhf_cli.algo.names`).

Each estimator turns the per-token rewards of the global batch (−β·KL per token when the KL is in the
reward, the score added at each response's last token) into per-token advantages. ``gae`` is PPO's
(Schulman et al. 2016) and the only one with a critic; the others are *critic-free*: they compare the
rewards of the G responses a prompt was given (``samples_per_prompt``), or whiten discounted returns
over the batch, so no value head is run or trained.

Layout: [B, T] response-aligned, B = number of responses, in prompt-major order: rows g·G … g·G + G − 1
are the G responses of prompt g. Every process holds the whole global batch when advantages are
computed (the engine's ``step`` gathers it first), so groups and batch statistics are global. Advantages
are 0 outside the mask.

A sequence's reward is R_i = Σ_t r_{i,t}: its score minus β times its summed KL (just the score when the
KL is not in the reward). All estimators here are computed before the PPO epochs, on the whole batch, so
mini-batches need not keep groups together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf_cli.algo.functional import Advantages, gae
from rlhf_cli.algo.names import ADVANTAGE_ESTIMATORS

# ε of the group standard deviation in GRPO's denominator (verl's value; TRL's GRPO uses 1e-4).
GROUP_STD_EPS = 1e-6


@dataclass(frozen=True)
class EstimatorSettings:
    """What an estimator reads of the config."""

    group_size: int  # G: responses per prompt
    gamma: float
    lam: float
    whiten_rewards: bool
    scale_by_std: bool  # grpo only


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """R_i = Σ_t r_{i,t} over each response's tokens: [B, T] -> [B]."""
    selected = mask.bool()
    return torch.where(selected, rewards, torch.zeros_like(rewards)).sum(dim=1)


def _grouped(values: Tensor, group_size: int) -> Tensor:
    """[B] -> [B / G, G]: one row per prompt (prompt-major order)."""
    if values.shape[0] % group_size != 0:
        raise ValueError(
            f"{values.shape[0]} responses cannot be split into groups of samples_per_prompt={group_size}; "
            "the batch must hold whole groups in prompt-major order."
        )
    return values.reshape(-1, group_size)


def _broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """A per-response value on every one of its tokens (0 outside the mask): [B], [B, T] -> [B, T]."""
    expanded = per_sequence.to(torch.float32).unsqueeze(1).expand(mask.shape)
    return torch.where(mask.bool(), expanded, torch.zeros_like(expanded))


def gae_advantages(rewards: Tensor, values: Optional[Tensor], mask: Tensor, settings: EstimatorSettings) -> Advantages:
    """PPO's generalised advantage estimation with the value head's values (Schulman et al. 2016,
    "High-Dimensional Continuous Control Using Generalized Advantage Estimation"); the formulas are
    :func:`rlhf_cli.algo.functional.gae`'s. G > 1 just gives each prompt several samples."""
    if values is None:
        raise ValueError("gae needs the value head's values; the trainer passed none.")
    return gae(values, rewards, mask, settings.gamma, settings.lam, settings.whiten_rewards)


def grpo_advantages(rewards: Tensor, values: Optional[Tensor], mask: Tensor, settings: EstimatorSettings) -> Advantages:
    """GRPO's group-relative advantage (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, outcome
    supervision): Â_i = (R_i − mean_g R) / (std_g R + ε) on every token of response i, with mean and
    (unbiased, n − 1) std over the G responses of its prompt, ε = :data:`GROUP_STD_EPS`.

    ``scale_by_std=False`` keeps only R_i − mean_g R: Dr. GRPO's unbiased form (Liu et al. 2025,
    "Understanding R1-Zero-Like Training", arXiv:2503.20783), which does not up-weight prompts whose
    responses barely differ.
    """
    groups = _grouped(sequence_rewards(rewards, mask), settings.group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if settings.scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return Advantages(advantages=_broadcast(centred.reshape(-1), mask), returns=None)


def rloo_advantages(rewards: Tensor, values: Optional[Tensor], mask: Tensor, settings: EstimatorSettings) -> Advantages:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740): Â_i = R_i − (1/(G−1)) Σ_{j≠i} R_j, the
    baseline being the mean reward of the prompt's *other* responses, on every token of response i.
    Equal to G/(G−1)·(R_i − mean_g R); computed as the leave-one-out mean directly, from the group sums
    (one pass, no per-row loop)."""
    groups = _grouped(sequence_rewards(rewards, mask), settings.group_size)
    g = settings.group_size
    others = (groups.sum(dim=1, keepdim=True) - groups) / (g - 1)
    return Advantages(advantages=_broadcast((groups - others).reshape(-1), mask), returns=None)


def reinforce_pp_advantages(
    rewards: Tensor, values: Optional[Tensor], mask: Tensor, settings: EstimatorSettings
) -> Advantages:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models", arXiv:2501.03262): per-token rewards with the KL penalty, discounted returns
    G_t = Σ_{s ≥ t} γ^{s−t} r_s, whitened over every response token of the global batch (masked mean,
    unbiased variance, ε = 1e-8); no critic and no group needed.

    The discounted return is GAE with V ≡ 0 and λ = 1 (δ_t = r_t, A_t = r_t + γ·A_{t+1}), so the
    recursion and whitening of :func:`~rlhf_cli.algo.functional.gae` serve unchanged.
    """
    zeros = torch.zeros_like(rewards, dtype=torch.float32)
    result = gae(zeros, rewards.to(torch.float32), mask, settings.gamma, 1.0, settings.whiten_rewards)
    return Advantages(advantages=result.advantages, returns=None)


# (rewards [B, T], values [B, T] or None, mask [B, T], settings) -> Advantages [B, T].
Estimate = Callable[[Tensor, Optional[Tensor], Tensor, EstimatorSettings], Advantages]

# Each estimator's function, by reference: a new estimator is one function above, one entry here
# and one in rlhf_cli.algo.names (what it needs of a run).
ESTIMATE: dict[str, Estimate] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}
assert tuple(ESTIMATE) == ADVANTAGE_ESTIMATORS, "rlhf_cli.algo.names and ESTIMATE must list the same estimators"


def settings_from(config) -> EstimatorSettings:
    """The estimator settings of any settings object with these fields (the engine's, or TRL's config)."""
    return EstimatorSettings(
        group_size=int(config.samples_per_prompt),
        gamma=float(config.gamma),
        lam=float(config.lam),
        whiten_rewards=bool(config.whiten_rewards),
        scale_by_std=bool(config.grpo_scale_by_std),
    )
