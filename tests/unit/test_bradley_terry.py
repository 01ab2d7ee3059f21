"""The Bradley–Terry loss and pair accuracy against a naive per-pair loop (issue 19)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.reward_model.bradley_terry import bradley_terry_loss, pair_correct, pair_losses
from rlhf_cli.reward_model.evaluate import pair_score


def _naive_loss(chosen, rejected, margin, tie, ties, center):
    """The textbook definition, one pair at a time in float64."""
    total, count = 0.0, 0
    for c, r, m, t in zip(chosen.tolist(), rejected.tolist(), margin.tolist(), tie.tolist()):
        if t and ties == "skip":
            continue
        d = c - r
        sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        if t:
            loss = -0.5 * math.log(sigmoid(d)) - 0.5 * math.log(sigmoid(-d))
        else:
            loss = -math.log(sigmoid(d - m))
        total += loss + center * (c + r) ** 2
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("ties", ["skip", "half"])
@pytest.mark.parametrize("center", [0.0, 0.01])
def test_loss_matches_a_per_pair_loop(ties, center):
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(32, generator=generator) * 2, torch.randn(32, generator=generator) * 2
    margin = torch.rand(32, generator=generator)
    tie = torch.rand(32, generator=generator) < 0.25
    loss = bradley_terry_loss(chosen, rejected, margin=margin, tie=tie, ties=ties, center_coefficient=center)
    assert loss.item() == pytest.approx(_naive_loss(chosen, rejected, margin, tie, ties, center), rel=1e-5)


def test_swapping_chosen_and_rejected_flips_the_sign():
    generator = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    forward, backward = pair_losses(chosen, rejected), pair_losses(rejected, chosen)
    # -log σ(-d) - (-log σ(d)) = d: the loss difference is exactly the score difference, sign and all.
    torch.testing.assert_close(backward - forward, chosen - rejected, rtol=1e-5, atol=1e-6)
    accuracy = pair_correct(chosen, rejected).mean().item()
    assert pair_correct(rejected, chosen).mean().item() == pytest.approx(1 - accuracy)
    assert accuracy == pytest.approx(sum(c > r for c, r in zip(chosen.tolist(), rejected.tolist())) / 64)


def test_normaliser_splits_a_batch_like_two_processes():
    """Two halves normalised by the global count over 2, averaged, give the whole batch's loss."""
    generator = torch.Generator().manual_seed(2)
    chosen, rejected = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    whole = bradley_terry_loss(chosen, rejected)
    halves = [bradley_terry_loss(chosen[s], rejected[s], normaliser=8 / 2) for s in (slice(0, 4), slice(4, 8))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


def test_pair_score_counts_equal_scores_as_half_and_skips_ties():
    result = pair_score("x", [1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 0.0], ties=[False, False, False, True])
    assert result.pairs == 3
    assert result.accuracy == pytest.approx((1 + 0.5 + 0) / 3)
    assert result.margin == pytest.approx((1 + 0 - 1) / 3)
    assert result.accuracy_se > 0
