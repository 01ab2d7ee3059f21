"""Running mean and standard deviation of every score seen, for score scaling.

The moments live in Python floats (float64) on the host: one update per step on a [B] vector
costs nothing next to a forward pass, and plain floats go into any checkpoint format.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_STATE_KEYS = ("mean", "var", "std", "count")


class RunningMoments:
    """Mean and standard deviation of all values passed to :meth:`update` so far.

    Starts from a prior of mean 0, variance 1, std 1 with weight ``count = 1e-24``, so the
    prior is negligible as soon as one batch is merged. ``var`` is the biased (population)
    variance of everything seen; ``std`` is the unbiased (Bessel-corrected) standard deviation.
    Until at least two values have been seen ``std`` keeps its prior value 1, because one value
    has no spread and dividing scores by a zero std would blow them up.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 1e-24

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Merge a batch of values (any shape, all elements) into the running moments.

        Uses Chan et al.'s parallel formula for combining (mean, M2, count) of two sets.
        Returns the batch's mean and unbiased std (0.0 for a single value).
        Raises ValueError for an empty or non-finite batch (one NaN would poison the moments
        of the rest of the run).
        """
        # One host transfer of a [B] vector; float64 keeps the merge exact enough over long runs.
        values = xs.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        n = values.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor `xs`; pass at least one value.")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("RunningMoments.update got non-finite values in `xs` (NaN or inf); check the scores.")
        batch_mean = float(values.mean())
        batch_var = float(values.var(unbiased=False))

        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        # total - 1 is 0.0 in float64 after a single value (the prior's 1e-24 is below epsilon).
        if total - 1.0 > 0.0:
            self.std = math.sqrt(self.var * total / (total - 1.0))
        self.count = total

        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        """The moments as plain floats (JSON- and ``torch.load(weights_only=True)``-safe)."""
        return {key: float(getattr(self, key)) for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore moments saved by :meth:`state_dict`; raises ValueError on missing keys."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"RunningMoments state is missing {', '.join(missing)}; expected keys {', '.join(_STATE_KEYS)}.")
        for key in _STATE_KEYS:
            setattr(self, key, float(state[key]))

    def __repr__(self) -> str:
        return f"RunningMoments(mean={self.mean:.6g}, std={self.std:.6g}, count={self.count:.6g})"
