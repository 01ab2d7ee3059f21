"""PPO math against naive loop references and hand-computed cases."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhf_cli.algo.functional import (
    Advantages,
    PolicyLoss,
    RewardTerms,
    ValueLoss,
    clip_by_value,
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    process_scores,
    ratio_guard,
    value_loss,
    whiten,
)
from rlhf_cli.algo.kl import full_kl, kl_penalty
from rlhf_cli.algo.running_moments import RunningMoments

torch.set_num_threads(1)

SEEDS = [0, 1, 2, 3]


# Fixtures: random tensors with ragged masks --------------------------------------------------------


def prefix_mask(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
    """Right-padded responses: row i has a random length in [1, width]; one row is full."""
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    lengths[0] = width
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


def scattered_mask(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
    """Arbitrary pattern (not a prefix) with at least one selected position per row."""
    mask = torch.rand(batch, width, generator=gen) < 0.5
    mask[torch.arange(batch), torch.randint(0, width, (batch,), generator=gen)] = True
    return mask


def garbage_outside(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Large junk at unselected positions: results must not depend on it."""
    return torch.where(mask, values, torch.full_like(values, 1e4))


def selected(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The masked values as Python floats, in row-major order (explicit loops)."""
    out = []
    for row_values, row_mask in zip(values.tolist(), mask.tolist()):
        for value, keep in zip(row_values, row_mask):
            if keep:
                out.append(value)
    return out


def naive_mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def naive_var(xs: list[float], unbiased: bool) -> float:
    mean = naive_mean(xs)
    ss = sum((x - mean) ** 2 for x in xs)
    return ss / (len(xs) - 1) if unbiased else ss / len(xs)


def naive_logsumexp(row: list[float]) -> float:
    top = max(row)
    return top + math.log(sum(math.exp(x - top) for x in row))


def as_float_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float64)


# logprobs and entropy ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_logprobs_from_logits_matches_log_softmax_gather_and_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (3, 4), generator=gen)
    got = logprobs_from_logits(logits, labels)
    assert got.shape == (3, 4)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for b in range(3):
        for t in range(4):
            row = logits[b, t].tolist()
            naive = row[labels[b, t]] - naive_logsumexp(row)
            assert got[b, t].item() == pytest.approx(naive, abs=1e-12)


def test_logprobs_from_logits_any_leading_shape_and_large_logits():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 2])
    got = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(got, torch.tensor([0.0, -math.log(3.0)]))
    assert logprobs_from_logits(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, dtype=torch.long)).shape == (2, 3, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_from_half_logits_are_float32_and_exact_for_the_rounded_logits(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 50, generator=gen) * 4 + 20).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 3), generator=gen)
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    reference_logits = logits.detach().double().requires_grad_()
    expected = torch.log_softmax(reference_logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    # The gradient of the memory-saving upcast path equals the float64 gradient (rounded to dtype).
    weights = torch.randn(2, 3, generator=gen)
    (got * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), reference_logits.grad, rtol=0, atol=1e-2)


def test_upcast_logsumexp_gradcheck():
    from rlhf_cli.algo.functional import _UpcastLogSumExp

    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_UpcastLogSumExp.apply, (logits,))


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_from_logits_matches_definition_and_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64) * 2 + 50
    got = entropy_from_logits(logits)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got, -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-12)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            lse = naive_logsumexp(row)
            naive = -sum(math.exp(x - lse) * (x - lse) for x in row)
            assert got[b, t].item() == pytest.approx(naive, abs=1e-12)


def test_entropy_exact_values_and_impossible_tokens():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf], [3.0, -math.inf, -math.inf, -math.inf]])
    logits.requires_grad_()
    got = entropy_from_logits(logits)
    torch.testing.assert_close(got, torch.tensor([math.log(4.0), math.log(2.0), 0.0]))
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.zeros(2, 8, dtype=torch.bfloat16)).dtype == torch.float32


# masked statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("make_mask", [prefix_mask, scattered_mask])
def test_masked_mean_matches_loop(seed, make_mask):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, 4, 6)
    values = garbage_outside(torch.randn(4, 6, generator=gen, dtype=torch.float64), mask)
    assert masked_mean(values, mask).item() == pytest.approx(naive_mean(selected(values, mask)), abs=1e-12)
    assert masked_mean(values, as_float_mask(mask)).item() == pytest.approx(naive_mean(selected(values, mask)), abs=1e-12)
    per_row = masked_mean(values, mask, axis=1)
    assert per_row.shape == (4,)
    for b in range(4):
        assert per_row[b].item() == pytest.approx(naive_mean(selected(values[b : b + 1], mask[b : b + 1])), abs=1e-12)
    per_col = masked_mean(values, mask, axis=0)
    for t in range(6):
        column = [values[b, t].item() for b in range(4) if mask[b, t]]
        if column:
            assert per_col[t].item() == pytest.approx(naive_mean(column), abs=1e-12)
        else:
            assert math.isnan(per_col[t].item())


def test_masked_mean_ignores_inf_outside_mask_and_rejects_shape_mismatch():
    values = torch.tensor([[1.0, 3.0, math.inf], [2.0, -math.inf, math.nan]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == 2.0
    with pytest.raises(ValueError, match="mask has shape"):
        masked_mean(values, mask[:, :2])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("make_mask", [prefix_mask, scattered_mask])
def test_masked_var_unbiased_biased_and_torch_var(seed, make_mask):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, 4, 6)
    values = garbage_outside(torch.randn(4, 6, generator=gen, dtype=torch.float64) * 3 + 10, mask)
    xs = selected(values, mask)
    unbiased = masked_var(values, mask)
    biased = masked_var(values, mask, unbiased=False)
    assert unbiased.item() == pytest.approx(naive_var(xs, unbiased=True), rel=1e-12)
    assert biased.item() == pytest.approx(naive_var(xs, unbiased=False), rel=1e-12)
    torch.testing.assert_close(unbiased, values[mask].var(unbiased=True))
    torch.testing.assert_close(biased, values[mask].var(unbiased=False))
    assert unbiased.item() == pytest.approx(biased.item() * len(xs) / (len(xs) - 1), rel=1e-12)


def test_masked_var_hand_computed_single_value_and_empty():
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(values, mask).item() == pytest.approx(5 / 3)
    one = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_var(values, one).item() == 0.0
    assert masked_var(values, one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="empty mask"):
        masked_var(values, torch.zeros(2, 3))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("make_mask", [prefix_mask, scattered_mask])
def test_masked_whiten_matches_loop_and_standardises(seed, make_mask):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, 4, 6)
    values = garbage_outside(torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2 - 5, mask)
    xs = selected(values, mask)
    mean, var = naive_mean(xs), naive_var(xs, unbiased=True)
    white = masked_whiten(values, mask)
    kept = masked_whiten(values, mask, shift_mean=False)
    for b in range(4):
        for t in range(6):
            expected = (values[b, t].item() - mean) / math.sqrt(var + 1e-8)
            assert white[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert kept[b, t].item() == pytest.approx(expected + mean, rel=1e-12, abs=1e-12)
    white_xs = selected(white, mask)
    assert naive_mean(white_xs) == pytest.approx(0.0, abs=1e-12)
    assert naive_var(white_xs, unbiased=True) == pytest.approx(1.0, abs=1e-6)
    kept_xs = selected(kept, mask)
    assert naive_mean(kept_xs) == pytest.approx(mean, abs=1e-12)
    assert naive_var(kept_xs, unbiased=True) == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_hand_computed():
    values = torch.tensor([[1.0, 3.0, 5.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    # mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    white = masked_whiten(values, mask, eps=0.0)
    torch.testing.assert_close(white[0, :3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    kept = masked_whiten(values, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept[0, :3], torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_whiten_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 4 + 1
    xs = [x for row in values.tolist() for x in row]
    mean, var = naive_mean(xs), naive_var(xs, unbiased=True)
    white = whiten(values)
    kept = whiten(values, shift_mean=False)
    for b in range(3):
        for t in range(5):
            expected = (values[b, t].item() - mean) / math.sqrt(var + 1e-8)
            assert white[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert kept[b, t].item() == pytest.approx(expected + mean, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(whiten(torch.tensor([4.0])), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="empty"):
        whiten(torch.zeros(0))


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_by_value_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, generator=gen)
    low = torch.randn(3, 4, generator=gen) - 0.5
    high = low + torch.rand(3, 4, generator=gen)
    got = clip_by_value(x, low, high)
    for b in range(3):
        for t in range(4):
            assert got[b, t].item() == min(max(x[b, t].item(), low[b, t].item()), high[b, t].item())
    scalar_bounds = clip_by_value(torch.tensor([-2.0, 0.5, 2.0]), torch.tensor(0.0), torch.tensor(1.0))
    torch.testing.assert_close(scalar_bounds, torch.tensor([0.0, 0.5, 1.0]))


# KL penalties --------------------------------------------------------------------------------------


def test_kl_penalty_modes_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    # d = [0.5, -1.0, 0.0]
    torch.testing.assert_close(kl_penalty(logprobs, ref, "kl"), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "abs"), torch.tensor([[0.5, 1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "mse"), torch.tensor([[0.125, 0.5, 0.0]]))


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_penalty_modes_match_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 4
    ref = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 4
    formulas = {"kl": lambda d: d, "abs": abs, "mse": lambda d: 0.5 * d * d}
    for mode, formula in formulas.items():
        got = kl_penalty(logprobs, ref, mode)
        for b in range(3):
            for t in range(5):
                assert got[b, t].item() == pytest.approx(formula(logprobs[b, t].item() - ref[b, t].item()), abs=1e-12)


def test_kl_penalty_rejects_full_and_unknown_modes():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="full_kl"):
        kl_penalty(x, x, "full")
    with pytest.raises(ValueError, match="kl, abs, mse"):
        kl_penalty(x, x, "reverse")


@pytest.mark.parametrize("seed", SEEDS)
def test_full_kl_matches_double_loop_over_vocab(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, generator=gen) * 2
    ref_logits = torch.randn(2, 3, 5, generator=gen) * 2
    got = full_kl(logits, ref_logits)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            p_row, q_row = logits[b, t].tolist(), ref_logits[b, t].tolist()
            lse_p, lse_q = naive_logsumexp(p_row), naive_logsumexp(q_row)
            naive = 0.0
            for v in range(5):
                logp, logq = p_row[v] - lse_p, q_row[v] - lse_q
                naive += math.exp(logp) * (logp - logq)
            assert got[b, t].item() == pytest.approx(naive, abs=1e-5)
            assert got[b, t].item() >= -1e-6


def test_full_kl_exact_cases_and_half_precision():
    logits = torch.tensor([[[0.0, 0.0, -math.inf], [1.0, 2.0, 3.0]]])
    ref = torch.tensor([[[0.0, math.log(3.0), -math.inf], [1.0, 2.0, 3.0]]])
    # p = (1/2, 1/2, 0), q = (1/4, 3/4, 0): KL = ½·log 2 + ½·log(2/3); identical rows give 0.
    expected = torch.tensor([[0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), 0.0]])
    torch.testing.assert_close(full_kl(logits, ref), expected)
    assert full_kl(logits.bfloat16(), ref.bfloat16()).dtype == torch.float32


# Scores and per-token rewards ----------------------------------------------------------------------


def test_process_scores_passthrough_and_clip_only():
    scores = torch.tensor([-3.0, 0.5, 2.0])
    torch.testing.assert_close(process_scores(scores, running=None, use_score_norm=False, score_clip=None), scores)
    torch.testing.assert_close(
        process_scores(scores, running=None, use_score_norm=True, score_clip=1.0), torch.tensor([-1.0, 0.5, 1.0])
    )
    with pytest.raises(ValueError, match="score_clip"):
        process_scores(scores, running=None, use_score_norm=False, score_clip=0.0)


def test_process_scores_scaling_norm_and_order():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    # mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3)
    std = math.sqrt(14 / 3)
    scaled = process_scores(scores, running=RunningMoments(), use_score_norm=False, score_clip=None)
    torch.testing.assert_close(scaled, scores / (std + eps))
    normed = process_scores(scores, running=RunningMoments(), use_score_norm=True, score_clip=None)
    torch.testing.assert_close(normed, (scores - 3.0) / (std + eps))
    # Scaling comes before clipping: 6 → 3/std ≈ 1.389 is clipped to 1.2, -2/std ≈ -0.926 is not.
    clipped = process_scores(scores, running=RunningMoments(), use_score_norm=True, score_clip=1.2)
    expected = [max(min((s - 3.0) / (std + eps), 1.2), -1.2) for s in scores.tolist()]
    torch.testing.assert_close(clipped, torch.tensor(expected, dtype=torch.float64))
    assert clipped[3].item() == 1.2 and -1.2 < clipped[0].item() < -0.9


def test_process_scores_updates_running_with_gathered_scores_across_steps():
    running = RunningMoments()
    local = torch.tensor([1.0, 3.0])
    gathered = torch.tensor([1.0, 3.0, 5.0, 7.0])
    out = process_scores(local, running=running, use_score_norm=True, score_clip=None, gathered=gathered)
    assert running.mean == pytest.approx(4.0)
    assert running.std == pytest.approx(statistics.stdev([1.0, 3.0, 5.0, 7.0]))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, (local - 4.0) / (running.std + eps))
    process_scores(torch.tensor([0.0, 8.0]), running=running, use_score_norm=False, score_clip=None)
    seen = [1.0, 3.0, 5.0, 7.0, 0.0, 8.0]
    assert running.mean == pytest.approx(statistics.mean(seen))
    assert running.std == pytest.approx(statistics.stdev(seen))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("make_mask", [prefix_mask, scattered_mask])
def test_per_token_rewards_matches_loop(seed, make_mask):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, 4, 6)
    kl = garbage_outside(torch.randn(4, 6, generator=gen, dtype=torch.float64), mask)
    scores = torch.randn(4, generator=gen, dtype=torch.float64)
    terms = per_token_rewards(scores, kl, mask, kl_coef=0.3)
    assert isinstance(terms, RewardTerms)
    for b in range(4):
        last = max(t for t in range(6) if mask[b, t])
        for t in range(6):
            non_score = -0.3 * kl[b, t].item() if mask[b, t] else 0.0
            reward = non_score + (scores[b].item() if t == last else 0.0)
            assert terms.non_score_rewards[b, t].item() == pytest.approx(non_score, abs=1e-12)
            assert terms.rewards[b, t].item() == pytest.approx(reward, abs=1e-12)


def test_per_token_rewards_hand_computed_and_empty_row():
    kl = torch.tensor([[0.5, 1.0, 7.0], [2.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    terms = per_token_rewards(torch.tensor([3.0, -1.0]), kl, mask, kl_coef=0.2)
    torch.testing.assert_close(terms.non_score_rewards, torch.tensor([[-0.1, -0.2, 0.0], [-0.4, 0.0, 0.0]]))
    torch.testing.assert_close(terms.rewards, torch.tensor([[-0.1, 2.8, 0.0], [-1.4, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(torch.tensor([3.0, -1.0]), kl, torch.tensor([[1, 1, 0], [0, 0, 0]]), kl_coef=0.2)


# GAE -----------------------------------------------------------------------------------------------


def naive_gae(values, rewards, mask, gamma, lam, whiten_rewards=False):
    """Per-sample, per-token GAE over each row's real tokens (prefix masks), plain floats."""
    batch, width = len(values), len(values[0])
    if whiten_rewards:
        xs = [rewards[b][t] for b in range(batch) for t in range(width) if mask[b][t]]
        mean, var = naive_mean(xs), naive_var(xs, unbiased=True)
        rewards = [[(r - mean) / math.sqrt(var + 1e-8) + mean for r in row] for row in rewards]
    raw = [[0.0] * width for _ in range(batch)]
    for b in range(batch):
        length = sum(1 for keep in mask[b] if keep)
        following = 0.0
        for t in reversed(range(length)):
            next_value = values[b][t + 1] if t + 1 < length else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            following = delta + gamma * lam * following
            raw[b][t] = following
    returns = [[raw[b][t] + values[b][t] if mask[b][t] else 0.0 for t in range(width)] for b in range(batch)]
    xs = [raw[b][t] for b in range(batch) for t in range(width) if mask[b][t]]
    mean, var = naive_mean(xs), naive_var(xs, unbiased=True)
    scale = math.sqrt(var + 1e-8)
    advantages = [[(raw[b][t] - mean) / scale if mask[b][t] else 0.0 for t in range(width)] for b in range(batch)]
    return advantages, returns


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.0, 0.7), (0.99, 0.0)])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_gae_matches_loop(seed, gamma, lam, whiten_rewards):
    gen = torch.Generator().manual_seed(seed)
    mask = prefix_mask(gen, 4, 6)
    values = garbage_outside(torch.randn(4, 6, generator=gen, dtype=torch.float64), mask)
    rewards = garbage_outside(torch.randn(4, 6, generator=gen, dtype=torch.float64), mask)
    got = gae(values, rewards, mask, gamma, lam, whiten_rewards=whiten_rewards)
    assert isinstance(got, Advantages)
    advantages, returns = naive_gae(values.tolist(), rewards.tolist(), mask.tolist(), gamma, lam, whiten_rewards)
    torch.testing.assert_close(got.advantages, torch.tensor(advantages, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.returns, torch.tensor(returns, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_gae_hand_computed():
    # One real row of 3 tokens followed by a padding position with junk; a second, shorter row.
    values = torch.tensor([[0.5, 1.0, -1.0, 7.0], [2.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0], [1.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    got = gae(values, rewards, mask, gamma=0.9, lam=0.5)
    # Row 0: δ2 = 2 + 0 − (−1) = 3, A2 = 3; δ1 = 0 + 0.9·(−1) − 1 = −1.9, A1 = −1.9 + 0.45·3 = −0.55;
    #        δ0 = 1 + 0.9·1 − 0.5 = 1.4, A0 = 1.4 + 0.45·(−0.55) = 1.1525.
    # Row 1: δ0 = 1 + 0 − 2 = −1, A0 = −1.
    raw = [1.1525, -0.55, 3.0, -1.0]
    expected_returns = torch.tensor([[1.6525, 0.45, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got.returns, expected_returns)
    mean, std = statistics.mean(raw), statistics.stdev(raw)
    expected = [[(a - mean) / std for a in raw[:3]] + [0.0], [(raw[3] - mean) / std, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(got.advantages, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_gae_whiten_rewards_keeps_padding_rewards_at_zero():
    # Whitening maps padding zeros to nonzero numbers; they must not leak into real tokens.
    values = torch.zeros(2, 3, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = gae(values, rewards, mask, gamma=1.0, lam=1.0, whiten_rewards=True)
    # Rewards over the mask: mean 3, unbiased std 2 → (r − 3)/2 + 3 = [2, 3], [4] (a padding 0 would
    # become 1.5). With V = 0 and γ = λ = 1 the returns are the reward-to-go within each row.
    expected = torch.tensor([[5.0, 3.0, 0.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got.returns, expected, rtol=1e-7, atol=1e-7)


# Losses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = scattered_mask(gen, 4, 6)
    old = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    logprobs = garbage_outside(old + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3, mask)
    advantages = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    got = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert isinstance(got, PolicyLoss)
    losses, clipped_flags, sq, neg, ratios = [], [], [], [], []
    for b in range(4):
        for t in range(6):
            if not mask[b, t]:
                continue
            diff = logprobs[b, t].item() - old[b, t].item()
            ratio = math.exp(diff)
            adv = advantages[b, t].item()
            unclipped, clipped = -adv * ratio, -adv * min(max(ratio, 0.8), 1.2)
            losses.append(max(unclipped, clipped))
            clipped_flags.append(1.0 if clipped > unclipped else 0.0)
            sq.append(diff * diff)
            neg.append(-diff)
            ratios.append(ratio)
    assert got.loss.item() == pytest.approx(naive_mean(losses), abs=1e-12)
    assert got.clipfrac.item() == pytest.approx(naive_mean(clipped_flags), abs=1e-12)
    assert got.approxkl.item() == pytest.approx(0.5 * naive_mean(sq), abs=1e-12)
    assert got.policykl.item() == pytest.approx(naive_mean(neg), abs=1e-12)
    assert got.ratio_mean.item() == pytest.approx(naive_mean(ratios), abs=1e-12)


def test_policy_loss_hand_computed_clipping_cases():
    log15, log05 = math.log(1.5), math.log(0.5)
    logprobs = torch.tensor([[log15, log15, log05, log05, 100.0]], requires_grad=True)
    old = torch.zeros(1, 5)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    got = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    # ρ = 1.5, A = 1: max(−1.5, −1.2) = −1.2 (clipped). ρ = 1.5, A = −1: max(1.5, 1.2) = 1.5.
    # ρ = 0.5, A = 1: max(−0.5, −0.8) = −0.5.          ρ = 0.5, A = −1: max(0.5, 0.8) = 0.8 (clipped).
    assert got.loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert got.clipfrac.item() == pytest.approx(0.5)
    assert got.ratio_mean.item() == pytest.approx((1.5 + 1.5 + 0.5 + 0.5) / 4, abs=1e-6)
    assert got.approxkl.item() == pytest.approx(0.5 * (2 * log15**2 + 2 * log05**2) / 4, abs=1e-6)
    assert got.policykl.item() == pytest.approx(-(2 * log15 + 2 * log05) / 4, abs=1e-6)
    assert got.loss.requires_grad
    assert not any(t.requires_grad for t in (got.clipfrac, got.approxkl, got.policykl, got.ratio_mean))
    got.loss.backward()
    # Clipped tokens get no gradient; unclipped get −A·ρ/4; padding (e^100 overflows float32) gets exactly 0.
    expected = torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_policy_loss_without_clipping_is_minus_mean_advantage_at_ratio_one():
    advantages = torch.tensor([[0.3, -1.0, 2.0]])
    logprobs = torch.full((1, 3), -1.0)
    got = policy_loss(logprobs, logprobs.clone(), advantages, torch.ones(1, 3), cliprange=0.2)
    assert got.loss.item() == pytest.approx(-(0.3 - 1.0 + 2.0) / 3)
    assert got.clipfrac.item() == 0.0 and got.approxkl.item() == 0.0 and got.ratio_mean.item() == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = scattered_mask(gen, 4, 6)
    old = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    vpreds = old + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.4
    returns = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    got = value_loss(vpreds, old, returns, mask, cliprange_value=0.2)
    assert isinstance(got, ValueLoss)
    losses, flags, preds, errors = [], [], [], []
    for b in range(4):
        for t in range(6):
            if not mask[b, t]:
                continue
            v, o, r = vpreds[b, t].item(), old[b, t].item(), returns[b, t].item()
            vclip = min(max(v, o - 0.2), o + 0.2)
            unclipped, clipped = (v - r) ** 2, (vclip - r) ** 2
            losses.append(max(unclipped, clipped))
            flags.append(1.0 if clipped > unclipped else 0.0)
            preds.append(v)
            errors.append(unclipped)
    assert got.loss.item() == pytest.approx(0.5 * naive_mean(losses), abs=1e-12)
    assert got.clipfrac.item() == pytest.approx(naive_mean(flags), abs=1e-12)
    assert got.vpred_mean.item() == pytest.approx(naive_mean(preds), abs=1e-12)
    assert got.error.item() == pytest.approx(naive_mean(errors), abs=1e-12)


def test_value_loss_hand_computed_clipping_cases():
    vpreds = torch.tensor([[0.5, 0.1, 0.5, -3.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    got = value_loss(vpreds, old, returns, mask, cliprange_value=0.2)
    # v=0.5, R=1: V̂ᶜ = 0.2, max(0.25, 0.64) = 0.64 (clipped active).
    # v=0.1, R=1: inside the band, both 0.81, not counted as clipped.
    # v=0.5, R=0: V̂ᶜ = 0.2, max(0.25, 0.04) = 0.25 (clipping inactive although v left the band).
    assert got.loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3, abs=1e-6)
    assert got.clipfrac.item() == pytest.approx(1 / 3)
    assert got.vpred_mean.item() == pytest.approx(1.1 / 3)
    assert got.error.item() == pytest.approx((0.25 + 0.81 + 0.25) / 3, abs=1e-6)
    assert got.loss.requires_grad and not got.error.requires_grad
    got.loss.backward()
    # Token 0 follows the clipped branch (constant in v): zero gradient.
    torch.testing.assert_close(vpreds.grad, torch.tensor([[0.0, (0.1 - 1.0) / 3, 0.5 / 3, 0.0]]))


# Ratio guard ---------------------------------------------------------------------------------------


def _guarded_grad(ratio_mean: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    loss = (weight * torch.tensor([0.5, 1.0, 2.0])).sum() ** 2
    guarded = ratio_guard(loss, torch.tensor(ratio_mean), threshold)
    guarded.backward()
    return guarded.detach(), weight.grad


def test_ratio_guard_zeroes_loss_and_gradients_when_tripped():
    value, grad = _guarded_grad(ratio_mean=12.0, threshold=10.0)
    assert value.item() == 0.0
    assert grad is not None and torch.equal(grad, torch.zeros(3))


def test_ratio_guard_keeps_loss_and_gradients_otherwise():
    value, grad = _guarded_grad(ratio_mean=10.0, threshold=10.0)
    # loss = (0.5 − 2 + 6)² = 20.25; d/dw = 2·4.5·[0.5, 1, 2]
    assert value.item() == pytest.approx(20.25)
    torch.testing.assert_close(grad, torch.tensor([4.5, 9.0, 18.0]))
