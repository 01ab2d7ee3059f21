"""KL coefficient controllers: adaptive (Ziegler et al. 2019) and fixed.

The coefficient β weighs the per-token KL penalty −β·KL in the reward. The trainer calls
``update`` once per PPO step with the step's mean (over samples) summed per-token KL and the
number of samples in the step across all processes, so every rank computes the same β.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable


@runtime_checkable
class KLController(Protocol):
    """What the trainer needs from a KL controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt ``value`` after a PPO step with mean KL ``current_kl`` over ``n_steps`` samples."""
        ...

    def state_dict(self) -> dict[str, float]:
        """The state needed to continue exactly (plain floats)."""
        ...

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


def _check_coef(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative KL coefficient, got {value!r}.")
    return float(value)


def _load_value(owner: str, state: dict[str, float]) -> float:
    if "value" not in state:
        raise ValueError(f"{owner} state has no 'value' entry; expected what {owner}.state_dict() returns.")
    return _check_coef(f"{owner} state 'value'", float(state["value"]))


class AdaptiveKLController:
    """β ← β·(1 + e·n/horizon) with e = clip(KL/target − 1, −0.2, 0.2).

    β grows when the policy drifts further than ``target`` nats from the reference and shrinks
    when it stays closer; ``horizon`` (in samples) sets how fast.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not target > 0:
            raise ValueError(f"target (the KL the adaptive controller aims for) must be positive, got {target!r}.")
        if not horizon > 0:
            raise ValueError(f"horizon (samples over which β adapts) must be positive, got {horizon!r}.")
        self.value = _check_coef("init_kl_coef", init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β towards keeping the KL at ``target``.

        Raises ValueError for a non-finite ``current_kl`` (it would make β NaN for the rest of
        the run) or a negative ``n_steps``.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}; the policy has diverged from the reference.")
        if n_steps < 0:
            raise ValueError(f"n_steps (samples in this step) must not be negative, got {n_steps!r}.")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """``{"value": β}``; target and horizon come from the config on resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β saved by :meth:`state_dict`."""
        self.value = _load_value(type(self).__name__, state)

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:.6g}, target={self.target:g}, horizon={self.horizon:g})"


class FixedKLController:
    """A constant β; :meth:`update` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = _check_coef("kl_coef", kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β constant."""

    def state_dict(self) -> dict[str, float]:
        """``{"value": β}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β saved by :meth:`state_dict`."""
        self.value = _load_value(type(self).__name__, state)

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:.6g})"


def make_kl_controller(adaptive: bool, init_kl_coef: float, target: float, horizon: float) -> KLController:
    """The adaptive controller when ``adaptive`` (validating target and horizon), else a fixed one."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
