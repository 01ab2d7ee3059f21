"""Seeding every random number generator a run touches (python, numpy, torch, CUDA)."""

from __future__ import annotations

from accelerate.utils import set_seed as _accelerate_set_seed


def set_seed(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (all devices) for reproducible runs."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    _accelerate_set_seed(seed)
