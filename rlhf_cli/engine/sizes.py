"""Global sizes (all processes together, as the command line speaks) split over the processes."""

from __future__ import annotations

from rlhf_cli.errors import ConfigError


def per_process(global_size: int, num_processes: int, key: str) -> int:
    """``global_size`` split evenly over the processes, or a ConfigError naming both numbers."""
    if global_size % num_processes != 0:
        raise ConfigError(
            f"{key}={global_size} is not divisible by the {num_processes} processes of this launch; "
            f"choose a multiple of {num_processes} (each process takes an equal share)."
        )
    return global_size // num_processes
