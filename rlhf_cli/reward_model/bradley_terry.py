"""The Bradley–Terry preference model as pure tensor functions (no model, no data loading).

Under Bradley–Terry, P(chosen ≻ rejected) = σ(r_c − r_r). Training minimises the negative log of that
probability over the labelled pairs. Two optional terms, both per pair:

* a margin m (a column of the data): −log σ(r_c − r_r − m), so a pair the labellers called a clear
  win must be won by at least m (Llama 2's margin loss);
* ties: a tied pair's target probability is 0.5 instead of 1. By default tied pairs carry no
  weight (they say nothing about which is better); ``ties="half"`` trains them towards
  σ(r_c − r_r) = 0.5 with the cross-entropy −½log σ(d) − ½log σ(−d).

Reward centring (Eisenstein et al. 2023, TRL's ``center_rewards_coefficient``): the rewards of a
Bradley–Terry model are defined only up to a constant; a penalty c·mean((r_c + r_r)²) keeps them near
zero, which makes a learned reward comparable across runs and safe to add to other rewards.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_cli.data.preferences import TIE_MODES  # data.ties: the data owns the option, the math obeys it


def pair_losses(
    chosen: Tensor, rejected: Tensor, margin: Optional[Tensor] = None, tie: Optional[Tensor] = None, ties: str = "skip"
) -> Tensor:
    """Per-pair loss [B] from the scores ``chosen`` [B] and ``rejected`` [B] (float).

    ``margin`` [B] (float, 0 where absent) is subtracted from the difference of untied pairs; ``tie`` [B]
    (bool) marks tied pairs, whose loss is 0 (``ties="skip"``) or the cross-entropy against 0.5
    (``ties="half"``; no margin applies to them).
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    difference = chosen - rejected
    shifted = difference - margin if margin is not None else difference
    losses = -F.logsigmoid(shifted)
    if tie is None:
        return losses
    tie = tie.to(torch.bool)
    tied_loss = -0.5 * (F.logsigmoid(difference) + F.logsigmoid(-difference)) if ties == "half" else torch.zeros_like(difference)
    return torch.where(tie, tied_loss, losses)


def pair_weights(tie: Optional[Tensor], size: int, ties: str = "skip", device=None) -> Tensor:
    """1.0 for every pair that counts in the loss, 0.0 for tied pairs skipped by ``ties="skip"``: [B] float."""
    if tie is None or ties == "half":
        return torch.ones(size, device=device)
    return (~tie.to(torch.bool)).to(torch.float32)


def centering_penalty(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair centring term (r_c + r_r)² [B]: zero when the pair's two rewards sum to zero."""
    return (chosen + rejected) ** 2


def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    *,
    margin: Optional[Tensor] = None,
    tie: Optional[Tensor] = None,
    ties: str = "skip",
    center_coefficient: float = 0.0,
    normaliser: Optional[float] = None,
) -> Tensor:
    """The training loss of a batch: a scalar.

    The sum of the per-pair losses (plus ``center_coefficient`` × the centring term of the counted pairs)
    divided by ``normaliser``, by default the number of counted pairs. Under several processes each
    passes the global count divided by the number of processes, so that the all-reduced mean of their
    gradients is the gradient of the global batch's mean loss however the pairs are split.
    """
    weights = pair_weights(tie, chosen.shape[0], ties, device=chosen.device)
    total = (pair_losses(chosen, rejected, margin, tie, ties) * weights).sum()
    if center_coefficient:
        total = total + center_coefficient * (centering_penalty(chosen, rejected) * weights).sum()
    count = float(weights.sum()) if normaliser is None else normaliser
    return total / max(count, 1.0)


def pair_correct(chosen: Tensor, rejected: Tensor) -> Tensor:
    """1.0 where r(chosen) > r(rejected), 0.5 on an exact tie of the scores, else 0.0: [B] float.

    Counting exact score ties as a half keeps a constant reward (e.g. an untrained head on inputs it
    cannot tell apart) at the 50 % a coin gets, rather than 0 %.
    """
    return (chosen > rejected).to(torch.float32) + 0.5 * (chosen == rejected).to(torch.float32)
