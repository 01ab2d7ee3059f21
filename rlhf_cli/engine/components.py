"""Turning the composed run config into the engine's parts, and the launch facts no setting can know.

The engine's settings and every rule about them come from ``rlhf_cli.config.engine_settings`` (sizes
global on the command line, per process in the engine; divided there, once). This module adds what
only the launch knows: the process state, the device's precision support, installed trackers and
peft, the sharding the launcher asked for (:func:`check_launch`), and the step count.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

from accelerate import PartialState
from accelerate.utils import is_bf16_available, parse_flag_from_env
from omegaconf import DictConfig, OmegaConf

from rlhf_cli.config.engine_settings import check_engine_settings, engine_settings
from rlhf_cli.config.launch import mixed_precision_of
from rlhf_cli.config.schema import TRACKERS
from rlhf_cli.errors import ConfigError
from rlhf_cli.models.builder import check_peft_installed
from rlhf_cli.ppo import precision as precision_support
from rlhf_cli.ppo.distributed import cpu_process_group_needed
from rlhf_cli.ppo.settings import Launch, PPOSettings, launched_with_fsdp

# Tracker name -> the package Accelerate needs for it.
_TRACKER_PACKAGES = {name: name for name in TRACKERS}  # each tracker's package has its name


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


def launch_state() -> PartialState:
    """This launch's process state (rank, number of processes, device): create it before anything else
    touches Accelerate. Processes launched on a machine without a GPU are joined over gloo on the CPU
    (Accelerate alone would leave each one running by itself; see ``ppo.distributed``)."""
    return PartialState(cpu=cpu_process_group_needed())


def _emulated_bf16(source: str, fix: str) -> str:
    """The refusal of bfloat16 compute on a CPU without native bfloat16 (no AVX-512 BF16 or AMX)."""
    # Measured on an AVX2-only AMD EPYC with torch 2.13: a 512x576 @ 576x1536 matmul takes 25 ms in
    # float32 and 980 ms in bfloat16 (or under bf16 autocast), one thread.
    return (
        f"{source} needs a CPU with native bfloat16 support (AVX-512 BF16 or AMX), which this one lacks: "
        f"PyTorch would emulate bfloat16, and its matmuls run about 40 times slower than float32 on such a "
        f"CPU. Use {fix} (float32) here."
    )


def check_mixed_precision(cfg: DictConfig, device_type: str) -> None:
    """A ConfigError if the run's mixed-precision mode cannot run on ``device_type`` (cpu, cuda, ...)."""
    mode, source = mixed_precision_of(cfg)
    if mode == "fp16" and device_type == "cpu":
        raise ConfigError(
            f"{source} needs a GPU, but this run is on the CPU: PyTorch has no float16 autocast for CPU "
            "training, and Accelerate would silently train in float32. Use ppo.precision=bf16 (bfloat16 weights with "
            "float32 masters), ppo.mixed_precision=bf16 (CPU autocast supports bfloat16) or ppo.mixed_precision=no."
        )
    if mode == "bf16" and device_type == "cpu" and not precision_support.cpu_supports_bf16():
        raise ConfigError(_emulated_bf16(source, "ppo.mixed_precision=no"))
    if mode == "bf16" and device_type != "cpu" and not is_bf16_available(True):
        raise ConfigError(
            f"{source} needs bfloat16 support, which this {device_type} device lacks (on NVIDIA: Ampere or newer). "
            "Use ppo.mixed_precision=fp16 or ppo.mixed_precision=no."
        )
    if mode == "fp16" and cfg.model.dtype == "float16":
        raise ConfigError(
            f"{source} with model.dtype=float16: fp16 mixed precision keeps float32 master weights and scales "
            "the loss, and its gradient scaler cannot unscale float16 gradients. Set model.dtype=float32 (the "
            "forward pass still runs in float16)."
        )


def check_precision(cfg: DictConfig, device_type: str) -> None:
    """A ConfigError if ``ppo.precision`` cannot run on ``device_type`` (its clash with mixed precision
    is a rule of the settings, checked with them)."""
    if cfg.ppo.precision != "bf16":
        return
    if device_type == "cpu" and not precision_support.cpu_supports_bf16():
        raise ConfigError(_emulated_bf16("ppo.precision=bf16", "ppo.precision=fp32"))
    if device_type != "cpu" and not is_bf16_available(True):
        raise ConfigError(
            f"ppo.precision=bf16 needs bfloat16 support, which this {device_type} device lacks (on NVIDIA: Ampere "
            "or newer). Use ppo.precision=fp32, optionally with ppo.mixed_precision=fp16."
        )


def with_resolved_precision(
    cfg: DictConfig, device_type: str, saved: Optional[DictConfig] = None, notify: Callable[[str], None] = print
) -> DictConfig:
    """``cfg`` with ``ppo.precision=auto`` resolved for ``device_type`` (or to the precision of the
    checkpoint config ``saved``, when resuming); its one-line notice, if any, goes to ``notify``.
    Called once, before any model loads: the run's config.yaml, its checkpoints and the engine see
    only the resolved value. ConfigError when a resumed bf16 run meets a device that cannot run bf16."""
    saved_precision = OmegaConf.select(saved, "ppo.precision") if saved is not None else None
    precision, notice = precision_support.resolve_precision(str(cfg.ppo.precision), device_type, saved_precision)
    if notice:
        notify(notice)
    if precision == cfg.ppo.precision:
        return cfg
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    resolved.ppo.precision = precision
    OmegaConf.set_readonly(resolved, True)
    try:
        check_precision(resolved, device_type)
    except ConfigError:
        if saved_precision is None:
            raise
        raise ConfigError(
            f"ppo.precision=auto resumes with the checkpoint's precision, {precision} (its optimiser state holds "
            f"float32 master weights), but this {device_type} cannot compute in bfloat16 at a useful speed. Resume "
            "it on a machine with native bfloat16 (a CPU with AVX-512 BF16 or AMX, an Ampere or newer GPU), or "
            "start a fresh run in another output_dir (with ppo.precision=auto it trains in fp32 here)."
        ) from None
    return resolved


def _launcher_zero_stage() -> Optional[int]:
    """The DeepSpeed ZeRO stage `accelerate launch` was given, when it was given as a stage."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    return int(stage) if stage.isdigit() else None


def check_launch(cfg: DictConfig, state: PartialState) -> None:
    """Everything about this launch that must hold before a model loads; ConfigError otherwise.

    Sizes divide by the number of processes (and agree with gradient accumulation), groups of
    responses fit the estimator and sit whole on one process, trackers are
    installed, the mixed-precision mode suits the device, peft is installed for LoRA, and the
    sharding the launcher asked for (DeepSpeed ZeRO-3, FSDP2) is one rlhf_cli supports.
    """
    check_engine_settings(cfg, state.num_processes)  # every rule of the settings, for this launch's processes
    check_trackers(list(cfg.logging.trackers))
    check_precision(cfg, state.device.type)
    check_mixed_precision(cfg, state.device.type)
    if cfg.model.lora.enabled:
        check_peft_installed()
    check_sharding_launch(cfg)


def check_sharding_launch(cfg: DictConfig) -> None:
    """FSDP2 (ppo.sharding=fsdp2, or Accelerate's fsdp_version: 2) is the sharding rlhf_cli runs; FSDP
    version 1 and DeepSpeed ZeRO-3 are refused. (What FSDP2 does not cover yet is a rule of the
    settings, rlhf_cli.ppo.rules, refused by the library too.)"""
    if launched_with_fsdp() and not launched_with_fsdp("2"):
        raise ConfigError(
            f"This launch uses FSDP version {os.environ.get('FSDP_VERSION', '1')}, which rlhf_cli does not run: it "
            "shards with FSDP2 (per-parameter sharding, torch.distributed.fsdp.fully_shard), which generates, saves "
            "final/ and resumes from sharded state. Set fsdp_version: 2 in your Accelerate config "
            "(configs/accelerate/fsdp.yaml), or launch with --multi_gpu and ppo.sharding=fsdp2."
        )
    if _launcher_zero_stage() == 3:
        raise ConfigError(
            "This launch uses DeepSpeed ZeRO-3, which rlhf_cli does not run: a separate reference model would "
            "not be sharded, and final/ and checkpoints are not gathered from ZeRO-3's partitions. Shard with "
            "FSDP2 instead (policy, value head, reference and optimiser state): launch with "
            "configs/accelerate/fsdp.yaml, or with --multi_gpu and ppo.sharding=fsdp2; or use ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2.yaml)."
        )


def prompts_per_step(cfg: DictConfig) -> int:
    """Prompts each step takes, all processes together: ppo.batch_size counts their responses."""
    return int(cfg.ppo.batch_size) // int(cfg.generation.samples_per_prompt)


def settings_and_launch(cfg: DictConfig, *, num_processes: int, tracker_dir: str) -> tuple[PPOSettings, Launch]:
    """The per-process settings of a run's engine, and its Accelerator's launch facts (trackers,
    tracker directory, mixed precision)."""
    trackers = check_trackers(list(cfg.logging.trackers))
    # Unset: Accelerate reads the launcher's choice itself.
    mixed = {"mixed_precision": str(cfg.ppo.mixed_precision)} if cfg.ppo.mixed_precision is not None else {}
    launch = Launch(
        log_with=trackers or None,
        tracker_project_name=cfg.logging.project,
        project_kwargs={"project_dir": tracker_dir, "logging_dir": tracker_dir},
        accelerator_kwargs=mixed,
    )
    return engine_settings(cfg, num_processes), launch  # an FSDP2 launch means sharding=fsdp2 (engine_values)


def total_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    """Steps to run: ``epochs`` × batches per epoch when epochs is set, else ``steps``."""
    if cfg.epochs is not None:
        if cfg.epochs < 1:
            raise ConfigError(f"epochs={cfg.epochs} must be at least 1 (or null to use steps).")
        return int(cfg.epochs) * batches_per_epoch
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be at least 1.")
    return int(cfg.steps)
