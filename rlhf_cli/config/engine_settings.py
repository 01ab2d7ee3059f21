"""The engine's settings of a composed ``rlhf train`` config, and their check in the command line's words.

The config speaks in global sizes (all processes together); :class:`~rlhf_cli.ppo.settings.PPOSettings`,
like legacy TRL, in per-process sizes. Every rule is :func:`rlhf_cli.ppo.rules.check_settings`'s,
phrased here for the command line (``ppo.NAME`` keys, global numbers). Torch-free: the command line
runs the check right after composition, before anything heavy is imported.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.config.launch import mixed_precision_of
from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo.rules import GLOBAL_SIZES, SettingsError, check_settings, command_line
from rlhf_cli.ppo.settings import PPOSettings, default_mini_batch_size, ppo_group_fields, sharding_of_launch


def engine_values(cfg: DictConfig) -> dict[str, Any]:
    """Every PPOSettings field of a composed config as plain values, sizes global. The model builder
    owns gradient checkpointing (model.gradient_checkpointing), so the engine is not asked for it; an
    FSDP2 launch (Accelerate's fsdp_version: 2) means sharding=fsdp2."""
    values = {f.name: _plain(cfg.ppo[f.name]) for f in ppo_group_fields()}
    values.update(seed=int(cfg.seed), samples_per_prompt=int(cfg.generation.samples_per_prompt),
                  gradient_checkpointing=False, sharding=sharding_of_launch(values["sharding"])[0])
    return values


def check_engine_settings(cfg: DictConfig, processes: int) -> None:
    """ConfigError, in the command line's words, for the first rule the ppo settings break on a
    launch of ``processes`` processes."""
    mode, source = mixed_precision_of(cfg)
    values = {**engine_values(cfg), "mixed_precision": mode, "peft_model": bool(cfg.model.lora.enabled)}
    phrasing = command_line(processes, source, sharding_source=sharding_of_launch(str(cfg.ppo.sharding))[1])
    try:
        check_settings(values, phrasing)
    except SettingsError as err:
        raise ConfigError(str(err)) from None


def engine_settings(cfg: DictConfig, processes: int) -> PPOSettings:
    """The checked, per-process settings of one of ``processes`` processes."""
    check_engine_settings(cfg, processes)
    values = engine_values(cfg)
    if values["mini_batch_size"] is None:  # the automatic size, taken from the global batch
        values["mini_batch_size"] = default_mini_batch_size(values["batch_size"])
    for key in GLOBAL_SIZES:
        if values[key] is not None:
            values[key] //= processes
    return PPOSettings(**values)


def _plain(value: Any) -> Any:
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
