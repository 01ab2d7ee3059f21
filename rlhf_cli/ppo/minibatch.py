"""One optimisation mini-batch's losses: the rows a process trains on, and the PPO loss over them.

Pure tensor code over the engine's rollout (no optimiser, no Accelerate): :meth:`PPOEngine._train_minibatch`
runs the forward pass, calls :func:`minibatch_losses`, and steps the optimiser.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from rlhf_cli.algo.functional import Advantages, PolicyLoss, ValueLoss, policy_loss, value_loss
from rlhf_cli.algo.kl import kl_loss
from rlhf_cli.ppo.forward import ResponseOutputs, RolloutScores
from rlhf_cli.ppo.settings import PPOSettings


class Rows(NamedTuple):
    """Rows of the global batch [B, T] (``index``) cut to a mini-batch's response ``width``."""

    index: Tensor
    width: int

    def take(self, tensor: Optional[Tensor]) -> Optional[Tensor]:
        return None if tensor is None else tensor[self.index.to(tensor.device), : self.width]


class MiniBatchLosses(NamedTuple):
    """The mini-batch's loss (before the ratio guard) and its parts."""

    total: Tensor
    policy: PolicyLoss
    value: Optional[ValueLoss]  # None without a critic
    kl: Optional[Tensor]  # the KL loss term; None when kl_loss_coef is 0


def minibatch_losses(
    out: ResponseOutputs,
    rows: Rows,
    rollout: RolloutScores,
    advantages: Advantages,
    mask: Tensor,
    settings: PPOSettings,
    *,
    critic: bool,
    token_count: Tensor,
) -> MiniBatchLosses:
    """Clipped policy loss, plus ``vf_coef`` × the clipped value loss (with a critic), plus
    ``kl_loss_coef`` × the KL loss term (when positive); every mean divides by ``token_count``, the
    response tokens of the whole global mini-batch, so the processes' shares add up to its mean."""
    pl = policy_loss(out.logprobs, rows.take(rollout.logprobs), rows.take(advantages.advantages), mask,
                     settings.cliprange, token_count=token_count)
    total, vl, kl_term = pl.loss, None, None
    if critic:
        vl = value_loss(out.values, rows.take(rollout.values), rows.take(advantages.returns), mask,
                        settings.cliprange_value, token_count=token_count)
        total = total + settings.vf_coef * vl.loss
    if settings.kl_loss_coef > 0:
        kl_term = kl_loss(out.logprobs, rows.take(rollout.ref_logprobs), mask, settings.kl_loss_estimator,
                          token_count=token_count)
        total = total + settings.kl_loss_coef * kl_term
    return MiniBatchLosses(total, pl, vl, kl_term)


def ratio_threshold_warning(threshold: float, skipped: int, step: int, ratio: Optional[float] = None) -> str:
    """The warning for mini-batches whose loss was zeroed because their mean probability ratio
    exceeded ``ratio_threshold``: the engine's, once a step, and the TRL surface's ``loss()``, for
    one mini-batch with its mean ``ratio``."""
    mean = "" if ratio is None else f" ({ratio:.2f})"
    return (
        f"The mean probability ratio{mean} exceeded ratio_threshold={threshold} in {skipped} mini-batch(es) "
        f"of step {step}; their loss was zeroed."
    )
