"""Turning the composed run config into the engine's parts: PPOConfig, trackers, step count.

The run config speaks in global sizes (all processes together); PPOConfig, like legacy TRL,
in per-process sizes. The division happens here, once, with errors that name the numbers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo.config import DEFAULT_MINI_BATCH_SIZE, PPOConfig

# Keys of the ppo group that are passed to PPOConfig under the same name.
_PPO_KEYS = (
    "learning_rate", "gradient_accumulation_steps", "ppo_epochs", "adap_kl_ctrl", "init_kl_coef",
    "kl_penalty", "target", "horizon", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef",
    "max_grad_norm", "early_stopping", "target_kl", "ratio_threshold", "use_score_scaling",
    "use_score_norm", "score_clip", "whiten_rewards", "disable_dropout", "weight_decay", "adam_eps",
)

# Tracker name -> the package Accelerate needs for it.
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def per_process(global_size: int, num_processes: int, key: str) -> int:
    """``global_size`` split evenly over the processes, or a ConfigError naming both numbers."""
    if global_size % num_processes != 0:
        raise ConfigError(
            f"{key}={global_size} is not divisible by the {num_processes} processes of this launch; "
            f"choose a multiple of {num_processes} (each process takes an equal share)."
        )
    return global_size // num_processes


def check_trackers(trackers: list[str]) -> list[str]:
    for name in trackers:
        package = _TRACKER_PACKAGES.get(name)
        if package is None:
            raise ConfigError(
                f"logging.trackers contains '{name}', which is not a supported tracker; use any of "
                f"{', '.join(_TRACKER_PACKAGES)} (or [] for none)."
            )
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logging.trackers asks for '{name}' but the '{package}' package is not installed; "
                f"run `pip install {package}` or remove it from logging.trackers."
            )
    return list(trackers)


def ppo_config_from(cfg: DictConfig, *, num_processes: int, tracker_dir: str) -> PPOConfig:
    """The per-process PPOConfig of a run."""
    ppo = cfg.ppo
    batch = per_process(int(ppo.batch_size), num_processes, "ppo.batch_size")
    global_mini = ppo.mini_batch_size if ppo.mini_batch_size is not None else min(int(ppo.batch_size), DEFAULT_MINI_BATCH_SIZE)
    mini = per_process(int(global_mini), num_processes, "ppo.mini_batch_size")
    trackers = check_trackers(list(cfg.logging.trackers))
    kwargs: dict[str, Any] = {key: OmegaConf.to_object(ppo[key]) if OmegaConf.is_config(ppo[key]) else ppo[key] for key in _PPO_KEYS}
    try:
        return PPOConfig(
            seed=int(cfg.seed),
            batch_size=batch,
            mini_batch_size=mini,
            log_with=trackers or None,
            tracker_project_name=cfg.logging.project,
            project_kwargs={"project_dir": tracker_dir, "logging_dir": tracker_dir},
            **kwargs,
        )
    except ValueError as err:
        # PPOConfig speaks per process; the user wrote global sizes under ppo.*.
        raise ConfigError(f"The ppo settings are inconsistent: {err} (sizes under ppo.* are global, over {num_processes} process(es)).") from err


def total_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    """Steps to run: ``epochs`` × batches per epoch when epochs is set, else ``steps``."""
    if cfg.epochs is not None:
        if cfg.epochs < 1:
            raise ConfigError(f"epochs={cfg.epochs} must be at least 1 (or null to use steps).")
        return int(cfg.epochs) * batches_per_epoch
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be at least 1.")
    return int(cfg.steps)
