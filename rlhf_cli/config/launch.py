"""What the launcher says about this launch, read from its environment without importing torch.

``accelerate launch`` and ``torchrun`` set ``WORLD_SIZE`` in every process they start, and
``accelerate launch --mixed_precision`` sets ``ACCELERATE_MIXED_PRECISION``; Accelerate's own state
reads the same variables later. Reading them here lets the command line check the settings against
the launch (sizes per process, precision) before torch is imported.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from rlhf_cli.errors import ConfigError


def launch_processes() -> int:
    """The number of processes of this launch (1 when not launched by a launcher)."""
    value = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"The environment variable WORLD_SIZE='{value}' is not a number of processes.") from None


def mixed_precision_of(cfg: DictConfig) -> tuple[str, str]:
    """The run's mixed-precision mode and where it was set: ``ppo.mixed_precision`` if given, else
    the launcher's (``accelerate launch --mixed_precision`` or its config file), else ``no``."""
    if cfg.ppo.mixed_precision is not None:
        return str(cfg.ppo.mixed_precision), f"ppo.mixed_precision={cfg.ppo.mixed_precision}"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher:
        return launcher.lower(), f"accelerate launch's mixed_precision={launcher.lower()}"
    return "no", "the default (no mixed precision)"
