"""KL controllers against the update rule written out."""

from __future__ import annotations

import json

import pytest

from rlhf_cli.algo.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    make_kl_controller,
)


def test_adaptive_controller_follows_the_formula_over_several_updates():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000.0)
    beta = 0.2
    # Far above target (clipped at +0.2), slightly above, at target, slightly below, far below (−0.2).
    for kl, n in [(50.0, 256), (6.6, 128), (6.0, 128), (5.7, 64), (0.0, 512), (-3.0, 128)]:
        error = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        beta = beta * (1.0 + error * n / 10000.0)
        controller.update(kl, n)
        assert controller.value == pytest.approx(beta, rel=1e-15)


def test_adaptive_controller_hand_computed_steps():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=2.0, horizon=100.0)
    controller.update(2.5, 10)  # e = 0.25 → clipped 0.2; β = 0.1 · (1 + 0.2·0.1) = 0.102
    assert controller.value == pytest.approx(0.102)
    controller.update(1.8, 50)  # e = −0.1; β = 0.102 · (1 − 0.05) = 0.0969
    assert controller.value == pytest.approx(0.0969)
    controller.update(2.0, 1000)  # e = 0: unchanged
    assert controller.value == pytest.approx(0.0969)


def test_fixed_controller_never_changes():
    controller = FixedKLController(0.05)
    for kl, n in [(100.0, 128), (0.0, 1), (6.0, 64)]:
        controller.update(kl, n)
    assert controller.value == 0.05


@pytest.mark.parametrize("make", [lambda: AdaptiveKLController(0.3, 6.0, 1000.0), lambda: FixedKLController(0.3)])
def test_state_dict_round_trip(make):
    controller = make()
    controller.update(20.0, 128)
    state = json.loads(json.dumps(controller.state_dict()))
    restored = make()
    restored.load_state_dict(state)
    assert restored.value == controller.value
    controller.update(1.0, 64)
    restored.update(1.0, 64)
    assert restored.value == controller.value
    with pytest.raises(ValueError, match="'value'"):
        restored.load_state_dict({})


def test_make_kl_controller_picks_the_kind_and_validates():
    adaptive = make_kl_controller(True, 0.2, 6.0, 10000.0)
    fixed = make_kl_controller(False, 0.2, 6.0, 10000.0)
    assert isinstance(adaptive, AdaptiveKLController) and isinstance(fixed, FixedKLController)
    assert isinstance(adaptive, KLController) and isinstance(fixed, KLController)
    assert adaptive.value == fixed.value == 0.2
    with pytest.raises(ValueError, match="target"):
        make_kl_controller(True, 0.2, 0.0, 10000.0)
    with pytest.raises(ValueError, match="horizon"):
        make_kl_controller(True, 0.2, 6.0, -1.0)
    with pytest.raises(ValueError, match="init_kl_coef"):
        make_kl_controller(True, -0.1, 6.0, 10000.0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(float("nan"))


def test_adaptive_update_rejects_non_finite_kl_and_negative_steps():
    controller = AdaptiveKLController(0.2, 6.0, 10000.0)
    with pytest.raises(ValueError, match="current_kl"):
        controller.update(float("nan"), 8)
    with pytest.raises(ValueError, match="n_steps"):
        controller.update(1.0, -1)
    assert controller.value == 0.2
