"""The advantage estimators of the registry and the KL-loss estimates, each against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.algo.advantages import ESTIMATE, GROUP_STD_EPS, EstimatorSettings, sequence_rewards
from rlhf_cli.algo.names import KL_LOSS_ESTIMATORS
from rlhf_cli.trl.config import PPOConfig
from rlhf_cli.algo.names import ADVANTAGE_ESTIMATORS, ESTIMATORS, estimator_named, estimators_without_groups
from rlhf_cli.algo.functional import gae, per_token_rewards
from rlhf_cli.algo.kl import K3_MAX, kl_loss, kl_loss_terms

G = 4


def _settings(**overrides) -> EstimatorSettings:
    values = dict(group_size=G, gamma=0.9, lam=0.95, whiten_rewards=False, scale_by_std=True)
    values.update(overrides)
    return EstimatorSettings(**values)


def _batch(groups: int = 3, width: int = 6, seed: int = 0):
    """Per-token rewards (−β·KL plus the score at the last token), ragged right-padded masks, and
    garbage outside the masks (which no estimator may read)."""
    gen = torch.Generator().manual_seed(seed)
    rows = groups * G
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    kl = torch.randn(rows, width, generator=gen) * 0.3
    scores = torch.randn(rows, generator=gen)
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.2).rewards
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e4))
    return rewards, mask, lengths.tolist()


def _naive_sequence_rewards(rewards, lengths):
    return [sum(float(rewards[i, t]) for t in range(n)) for i, n in enumerate(lengths)]


def _assert_per_token(advantages, expected_per_row, lengths):
    for i, n in enumerate(lengths):
        for t in range(advantages.shape[1]):
            want = expected_per_row[i] if t < n else 0.0
            assert float(advantages[i, t]) == pytest.approx(want, rel=1e-5, abs=1e-6), (i, t)


def test_the_registry_is_the_one_list_of_names():
    assert ADVANTAGE_ESTIMATORS == ("gae", "grpo", "rloo", "reinforce_pp")
    assert [name for name, e in ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert estimators_without_groups() == ["gae", "reinforce_pp"]
    with pytest.raises(ValueError, match="valid: gae, grpo, rloo, reinforce_pp"):
        estimator_named("ppo")


def test_sequence_reward_is_the_score_minus_beta_times_the_summed_kl():
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kl = torch.randn(2, 3, generator=gen)
    scores = torch.tensor([0.5, -1.0])
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.3).rewards
    expected = [0.5 - 0.3 * float(kl[0].sum()), -1.0 - 0.3 * float(kl[1, 0])]
    assert sequence_rewards(rewards, mask).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_against_a_naive_loop(scale_by_std):
    rewards, mask, lengths = _batch()
    totals = _naive_sequence_rewards(rewards, lengths)
    expected = []
    for start in range(0, len(totals), G):
        group = totals[start : start + G]
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))  # unbiased, as torch.std
        expected += [(r - mean) / (std + GROUP_STD_EPS) if scale_by_std else r - mean for r in group]
    result = ESTIMATE["grpo"](rewards, None, mask, _settings(scale_by_std=scale_by_std))
    assert result.returns is None
    _assert_per_token(result.advantages, expected, lengths)


def test_rloo_against_a_naive_loop():
    rewards, mask, lengths = _batch(seed=2)
    totals = _naive_sequence_rewards(rewards, lengths)
    expected = []
    for start in range(0, len(totals), G):
        group = totals[start : start + G]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            expected.append(r - sum(others) / len(others))
    result = ESTIMATE["rloo"](rewards, None, mask, _settings())
    _assert_per_token(result.advantages, expected, lengths)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_against_a_naive_loop(gamma):
    rewards, mask, lengths = _batch(seed=3)
    returns = {}
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            running = float(rewards[i, t]) + gamma * running
            returns[i, t] = running
    values = list(returns.values())
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    result = ESTIMATE["reinforce_pp"](rewards, None, mask, _settings(gamma=gamma, group_size=1))
    for (i, t), g in returns.items():
        assert float(result.advantages[i, t]) == pytest.approx((g - mean) / math.sqrt(var + 1e-8), rel=1e-5, abs=1e-6)
    assert bool((result.advantages[~mask] == 0).all())


def test_gae_through_the_registry_is_the_functional_gae():
    rewards, mask, _ = _batch(seed=4)
    values = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(5))
    settings = _settings(whiten_rewards=True)
    via_registry = ESTIMATE["gae"](rewards, values, mask, settings)
    direct = gae(values, rewards, mask, settings.gamma, settings.lam, whiten_rewards=True)
    assert torch.equal(via_registry.advantages, direct.advantages)
    assert torch.equal(via_registry.returns, direct.returns)


def test_group_estimators_refuse_a_batch_of_partial_groups():
    rewards, mask, _ = _batch()
    with pytest.raises(ValueError, match="groups of samples_per_prompt=5"):
        ESTIMATE["grpo"](rewards, None, mask, _settings(group_size=5))


def test_a_group_with_equal_rewards_gets_zero_advantage_not_nan():
    rewards = torch.ones(G, 3)
    mask = torch.ones(G, 3, dtype=torch.bool)
    for name in ("grpo", "rloo"):
        result = ESTIMATE[name](rewards, None, mask, _settings())
        assert torch.equal(result.advantages, torch.zeros(G, 3)), name


# KL loss estimates (Schulman 2020) -----------------------------------------------------------------


def test_kl_loss_terms_against_their_formulas():
    logp = torch.tensor([-1.0, -2.5, -0.1])
    ref = torch.tensor([-1.5, -0.5, -0.1])
    for estimator in KL_LOSS_ESTIMATORS:
        got = kl_loss_terms(logp, ref, estimator)
        for i in range(3):
            log_r = float(ref[i] - logp[i])
            want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[estimator]
            assert float(got[i]) == pytest.approx(want, rel=1e-6), (estimator, i)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_loss_terms(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_the_kl_and_k3_is_never_negative():
    """Tokens sampled from p: the means of k1 and k3 approach KL(p‖q); every k3 is ≥ 0."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=gen), dim=0)
    logq = torch.log_softmax(torch.randn(6, generator=gen), dim=0)
    exact = float((logp.exp() * (logp - logq)).sum())
    tokens = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    for estimator in ("k1", "k3"):
        terms = kl_loss_terms(logp[tokens], logq[tokens], estimator)
        standard_error = float(terms.std()) / math.sqrt(terms.numel())
        assert abs(float(terms.mean()) - exact) < 4 * standard_error, estimator
    assert float(kl_loss_terms(logp[tokens], logq[tokens], "k3").min()) >= 0.0


def test_k3_is_bounded_so_one_far_off_token_cannot_blow_up_the_update():
    """log r = 14 (a token the policy made e^14 times less likely than the reference): k3 is capped at
    K3_MAX with no gradient from this term, where the raw formula would give 1.2e6."""
    logp = torch.tensor([-15.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.2])
    terms = kl_loss_terms(logp, ref, "k3")
    assert float(terms[0]) == K3_MAX
    assert float(terms[1]) == pytest.approx(math.exp(-0.2) - 1 + 0.2, rel=1e-6)
    terms.sum().backward()
    assert float(logp.grad[0]) == 0.0 and float(logp.grad[1]) != 0.0


def test_kl_loss_is_a_masked_mean_that_ignores_padding_garbage():
    logp = torch.tensor([[-1.0, -2.0, float("inf")], [-0.5, float("nan"), float("-inf")]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.0, 3.0], [-0.7, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss = kl_loss(logp, ref, mask, "k3")
    real = kl_loss_terms(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.0, -0.7]), "k3")
    assert float(loss.detach()) == pytest.approx(float(real.mean()), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and float(logp.grad[~mask].abs().sum()) == 0.0
    assert float(kl_loss(logp.detach(), ref, mask, "k3", token_count=6.0)) == pytest.approx(float(real.sum()) / 6, rel=1e-6)


# Config checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_need_two_samples_per_prompt(estimator):
    # The command line's message, in field names: it names a concrete group size, not just the minimum.
    with pytest.raises(ValueError, match=r"samples_per_prompt=1: a group of one has no spread.*Set samples_per_prompt=4"
                                         r".*advantage_estimator=gae or advantage_estimator=reinforce_pp"):
        PPOConfig(advantage_estimator=estimator)
    assert not PPOConfig(advantage_estimator=estimator, samples_per_prompt=2, batch_size=8).uses_critic


def test_a_batch_that_splits_a_group_is_refused():
    with pytest.raises(ValueError, match="batch_size=10 .* not divisible by samples_per_prompt=4"):
        PPOConfig(batch_size=10, mini_batch_size=2, samples_per_prompt=4, advantage_estimator="grpo")
    config = PPOConfig(batch_size=8, mini_batch_size=2, samples_per_prompt=4, advantage_estimator="grpo")
    config.batch_size = 6  # mutated after construction: the settings a trainer takes from it see it
    with pytest.raises(ValueError, match="batch_size=6 counts responses and is not divisible by samples_per_prompt=4"):
        config.settings()


def test_unknown_estimator_names_are_refused():
    with pytest.raises(ValueError, match="advantage_estimator must be one of gae, grpo, rloo, reinforce_pp"):
        PPOConfig(advantage_estimator="grpo2")
    with pytest.raises(ValueError, match="kl_loss_estimator must be one of k1, k2, k3"):
        PPOConfig(kl_loss_estimator="k4")
