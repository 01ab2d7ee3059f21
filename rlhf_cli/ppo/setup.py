"""Building a PPO engine's parts: its Accelerator, the checked arguments, the reference model, the
default optimiser (sharded or with float32 masters as the settings ask), the value head's freezing for
a critic-free estimator, and the parts prepared by Accelerate.

Pure construction (no PPO math, no step state): the trainer checks its arguments, then
:func:`build_parts` builds the rest in the order the trainer's ``__init__`` documents.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

from rlhf_cli.algo.names import AdvantageEstimator, estimator_named
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import PreTrainedModelWrapper, create_reference_model
from rlhf_cli.models import disable_dropout as switch_off_dropout
from rlhf_cli.ppo.distributed import cpu_process_group_needed
from rlhf_cli.ppo.precision import apply_precision
from rlhf_cli.ppo.rules import ENGINE, check_settings
from rlhf_cli.ppo.settings import Launch, PPOSettings, Sizes, sharding_of_launch
from rlhf_cli.ppo.sharding import shard_for_training, sharding_wanted
from rlhf_cli.rollout.unwrap import zero_stage
from rlhf_cli.seeding import set_seed


def make_accelerator(launch: Launch, gradient_accumulation_steps: int) -> Accelerator:
    """The Accelerator of a trainer: the launch's trackers, project and accelerator keyword arguments.

    Gradient accumulation counts mini-batches only (not the end of a dataloader, which would force an
    optimiser step on every mini-batch of a dataloader's last batch), and a prepared scheduler steps
    once per ``step()`` whatever the number of processes.
    """
    kwargs = dict(launch.accelerator_kwargs)
    # Processes launched on a CPU-only machine must be told to join over gloo (see distributed.py).
    kwargs.setdefault("cpu", cpu_process_group_needed())
    kwargs.setdefault("step_scheduler_with_optimizer", False)
    if "gradient_accumulation_plugin" not in kwargs:
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        )
    return Accelerator(log_with=launch.log_with, project_config=ProjectConfiguration(**launch.project_kwargs), **kwargs)


def check_model_arguments(model: Any, ref_model: Any) -> None:
    """TypeError unless ``model`` (and ``ref_model``, when given) are value-head models."""
    if not isinstance(model, PreTrainedModelWrapper):
        raise TypeError(
            "model must be an AutoModelForCausalLMWithValueHead or AutoModelForSeq2SeqLMWithValueHead "
            f"(got {type(model).__name__}); wrap a transformers model with "
            "AutoModelForCausalLMWithValueHead.from_pretrained(model)."
        )
    if ref_model is not None and not isinstance(ref_model, PreTrainedModelWrapper):
        raise TypeError(f"ref_model must be a value-head model like model, or None; got {type(ref_model).__name__}.")


def check_engine_arguments(settings: PPOSettings, launch: Launch, model: PreTrainedModelWrapper) -> None:
    """Every rule of the settings (rlhf_cli.ppo.rules: the command line's too) for this launch's mixed
    precision, this policy (a PEFT model or not) and the sharding the launcher may have chosen."""
    sharding, source = sharding_of_launch(settings.sharding)
    values = {**settings.to_dict(), "sharding": sharding, "peft_model": bool(model.is_peft_model),
              "mixed_precision": launch.accelerator_kwargs.get("mixed_precision")}
    check_settings(values, dataclasses.replace(ENGINE, sharding_source=source))


def shared_layers(ref_model: Any, num_shared_layers: Optional[int]) -> Optional[int]:
    """``num_shared_layers``, or None (with a warning) when an explicit reference makes it meaningless."""
    if ref_model is not None and num_shared_layers is not None:
        warnings.warn(
            "num_shared_layers is ignored when ref_model is given: the reference is that model and no "
            "layers are shared with the policy.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return num_shared_layers


def check_sharding(accelerator: Accelerator, model: PreTrainedModelWrapper, ref_model: Optional[PreTrainedModelWrapper]) -> None:
    """ZeRO-3 only with a PEFT policy that is its own reference (ConfigError otherwise)."""
    if zero_stage(accelerator) == 3 and not (ref_model is None and model.is_peft_model):
        raise ConfigError(
            "DeepSpeed ZeRO-3 shards the policy's parameters over the processes, but a separate reference "
            "model (a frozen copy, or the ref_model given) would be a full unsharded copy on every device, "
            "copied from parameters ZeRO-3 may already have partitioned; running it would need its own "
            "DeepSpeed inference engine, which rlhf_cli does not build. Use LoRA (model.lora.enabled=true, or a "
            "PEFT model with ref_model=None: the reference is then the policy with its adapter disabled), or "
            "launch with ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)."
        )


def reference_model(
    model: PreTrainedModelWrapper,
    ref_model: Optional[PreTrainedModelWrapper],
    num_shared_layers: Optional[int],
    *,
    disable_dropout: bool,
) -> Optional[PreTrainedModelWrapper]:
    """The reference: an explicit model, the adapter-less policy (PEFT: None), or a frozen copy;
    dropout switched off in policy and reference when ``disable_dropout``."""
    if ref_model is None and not model.is_peft_model:
        ref_model = create_reference_model(model, num_shared_layers=num_shared_layers)
    if disable_dropout:
        switch_off_dropout(model)
        if ref_model is not None:
            switch_off_dropout(ref_model)
    return ref_model


def default_optimizer(model: PreTrainedModelWrapper, config: PPOSettings, device: torch.device) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (the optimiser a trainer builds when none is given)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates all parameters in one pass: 5x faster than torch's per-tensor
    # default on CPU (12 ms vs 60 ms per step for a 6 x 384 GPT-2), run 16x per PPO step.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(
        trainable,
        lr=config.learning_rate,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
    )


def freeze_value_head(model: PreTrainedModelWrapper) -> None:
    """A critic-free estimator never runs the value head, so it is never trained: frozen before the
    optimiser is built (no optimiser state for it) and before DDP wraps the model (which would otherwise
    wait for gradients that never come). It is still saved with the model, unchanged."""
    model.v_head.requires_grad_(False)


def training_optimizer(
    accelerator: Accelerator, settings: PPOSettings, sharded: bool, model: PreTrainedModelWrapper,
    ref_model: Optional[PreTrainedModelWrapper], optimizer: Optional[torch.optim.Optimizer],
) -> torch.optim.Optimizer:
    """The optimiser (the given one, or Adam) over the parameters as they will train: sharded first
    with ``sharding="fsdp2"`` (policy and reference; bf16 is then FSDP2's mixed-precision policy,
    see rlhf_cli.ppo.sharding), else with ``precision="bf16"``'s float32 masters."""
    device = accelerator.device
    if sharded:
        build = lambda m: default_optimizer(m, settings, device)  # noqa: E731
        return shard_for_training(model, ref_model, optimizer, build, device=device, precision=settings.precision)
    if settings.precision == "bf16":
        # The float32 masters are copies of the weights: made where the weights will live (on a GPU they
        # were made on the CPU before Accelerate moved the model, and the first step failed assigning
        # CUDA gradients to CPU masters; seen on an H200).
        model.to(device)
    optimizer = optimizer if optimizer is not None else default_optimizer(model, settings, device)
    # precision="bf16": bfloat16 policy and reference, float32 masters in the optimiser.
    return apply_precision(settings.precision, optimizer, model, ref_model)


def prepare_parts(accelerator: Accelerator, sharded: bool, model: PreTrainedModelWrapper, optimizer: torch.optim.Optimizer,
                  ref_model: Optional[PreTrainedModelWrapper], dataloader: Any, lr_scheduler: Any) -> tuple[Any, ...]:
    """(model, optimiser, dataloader, scheduler) through ``accelerator.prepare``, and the reference
    (not prepared: frozen) on the device."""
    # Accelerate wraps the scheduler (trainer.lr_scheduler.scheduler is the user's); see make_accelerator.
    # An empty dataloader stays unprepared: Accelerate 1.1-1.3 (TRL 0.11's) fail iterating a prepared one.
    prepare_dataloader = dataloader is not None and len(dataloader) > 0
    extras = [x for x in (dataloader if prepare_dataloader else None, lr_scheduler) if x is not None]
    if sharded and not accelerator.is_fsdp2:
        # Already sharded: Accelerate must not wrap it in DDP; it prepares the optimiser only.
        model, (optimizer, *prepared) = model, accelerator.prepare(optimizer, *extras, None)[:-1]
    else:
        model, optimizer, *prepared = accelerator.prepare(model, optimizer, *extras)
    dataloader = prepared.pop(0) if prepare_dataloader else dataloader
    lr_scheduler = prepared.pop(0) if lr_scheduler is not None else None
    ref_model = ref_model.to(accelerator.device) if ref_model is not None else None
    return model, optimizer, dataloader, lr_scheduler, ref_model


class EngineParts(NamedTuple):
    """What :func:`build_parts` hands the engine."""

    estimator: AdvantageEstimator
    accelerator: Accelerator
    sizes: Sizes
    sharded: bool  # FSDP2: the trainer shards its models itself (rlhf_cli.ppo.sharding)
    prepared: tuple[Any, ...]  # (model, optimiser, dataloader, scheduler, reference), as prepare_parts returns them


def build_parts(settings: PPOSettings, launch: Launch, model: PreTrainedModelWrapper, ref_model: PreTrainedModelWrapper | None,
                *, optimizer: torch.optim.Optimizer | None, num_shared_layers: int | None, lr_scheduler: Any,
                dataloader: Any) -> EngineParts:
    """The arguments checked, then in this order: accelerator and sizes, the seed, the reference model,
    the value head frozen when no critic is trained, the optimiser, gradient checkpointing, and
    everything prepared by Accelerate."""
    check_model_arguments(model, ref_model)
    check_engine_arguments(settings, launch, model)
    num_shared_layers = shared_layers(ref_model, num_shared_layers)
    estimator = estimator_named(settings.advantage_estimator)
    accelerator = make_accelerator(launch, settings.gradient_accumulation_steps)
    sizes = settings.sizes(accelerator.num_processes)
    check_sharding(accelerator, model, ref_model)
    set_seed(settings.seed)
    ref_model = reference_model(model, ref_model, num_shared_layers, disable_dropout=settings.disable_dropout)
    if not estimator.needs_critic:
        freeze_value_head(model)
    sharded = sharding_wanted(settings, accelerator)
    optimizer = training_optimizer(accelerator, settings, sharded, model, ref_model, optimizer)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    prepared = prepare_parts(accelerator, sharded, model, optimizer, ref_model, dataloader, lr_scheduler)
    return EngineParts(estimator, accelerator, sizes, sharded, prepared)
