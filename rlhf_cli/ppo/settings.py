"""The engine's settings: every PPO knob with its default and its range, frozen once built.

Torch-free on purpose: the command line's schema (``rlhf_cli.config.schema``) is generated from
:class:`PPOSettings` without importing torch, and the TRL layer's ``PPOConfig`` takes its defaults
from here. Ranges and enumerations are recorded as field metadata (``choices``, ``ge``, ``gt``,
``le``), read by the command line's validator and by the library's checks alike.

Sizes are per process, as in legacy TRL: ``batch_size`` responses go into each ``step`` on each
process. The command line speaks in global sizes and divides them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from rlhf_cli.algo.names import ADVANTAGE_ESTIMATORS, AUTO_PRECISION, KL_LOSS_ESTIMATORS, KL_PENALTY_MODES, PRECISIONS, SHARDINGS

# The mini-batch size mini_batch_size=None stands for: the whole batch, up to this many (TRL: 128).
DEFAULT_MINI_BATCH_SIZE = 128


def knob(default: Any, **limits: Any) -> Any:
    """A settings field whose allowed values (``choices``, ``ge``, ``gt``, ``le``) are its metadata."""
    return field(default=default, metadata=limits)


@dataclass(frozen=True)
class PPOSettings:
    """Every knob of a PPO run, in the order ``rlhf train --cfg job`` shows the ppo group.

    The last three fields are set by the command line from other groups (``seed``,
    ``generation.samples_per_prompt``, ``model.gradient_checkpointing``); every other field is the
    command line's ``ppo.NAME``.
    """

    learning_rate: float = knob(1.41e-5, gt=0)
    # sizes (per process here; global on the command line)
    batch_size: int = knob(128, ge=1)
    mini_batch_size: Optional[int] = knob(None, ge=1)  # None: the whole batch, up to 128
    gradient_accumulation_steps: int = knob(1, ge=1)
    ppo_epochs: int = knob(4, ge=1)
    # samples per no-gradient forward pass (old logprobs/values, reference); None: the whole batch
    forward_batch_size: Optional[int] = knob(None, ge=1)

    # Advantages: "gae" (PPO with a value head, TRL's), or a critic-free estimator of
    # rlhf_cli.algo.advantages ("grpo", "rloo", "reinforce_pp"): no value head is run or trained.
    advantage_estimator: str = knob("gae", choices=ADVANTAGE_ESTIMATORS)
    # grpo: divide by the group's reward std (GRPO); False: only subtract the group mean (Dr. GRPO).
    grpo_scale_by_std: bool = knob(True)

    # KL penalty and its controller
    # Put −β·KL into the per-token rewards (TRL's PPO; β from the controller below). False: no
    # reward-side penalty (β reported as 0); use kl_loss_coef to keep the policy near the reference.
    kl_in_reward: bool = knob(True)
    adap_kl_ctrl: bool = knob(True)
    init_kl_coef: float = knob(0.2, ge=0)
    kl_penalty: str = knob("kl", choices=KL_PENALTY_MODES)
    target: float = knob(6.0, gt=0)
    horizon: float = knob(10000.0, gt=0)
    # Weight of a KL(π‖π_ref) term added to the loss (GRPO's way; 0: none), estimated per token by
    # kl_loss_estimator from the sampled tokens.
    kl_loss_coef: float = knob(0.0, ge=0)
    kl_loss_estimator: str = knob("k3", choices=KL_LOSS_ESTIMATORS)

    # advantages and losses
    gamma: float = knob(1.0, ge=0, le=1)
    lam: float = knob(0.95, ge=0, le=1)
    cliprange: float = knob(0.2, gt=0)
    cliprange_value: float = knob(0.2, gt=0)
    vf_coef: float = knob(0.1, ge=0)
    max_grad_norm: Optional[float] = knob(None, gt=0)

    early_stopping: bool = knob(False)
    target_kl: float = knob(1.0, gt=0)
    ratio_threshold: float = knob(10.0, gt=0)

    # scores and rewards
    use_score_scaling: bool = knob(False)
    use_score_norm: bool = knob(False)
    score_clip: Optional[float] = knob(None, gt=0)
    whiten_rewards: bool = knob(False)

    # Deliberate difference from legacy TRL: dropout makes old and new logprobs disagree on the
    # same weights, so it is switched off in policy, value head and reference during PPO.
    disable_dropout: bool = knob(True)

    # optimiser
    weight_decay: float = knob(0.0, ge=0)
    adam_eps: float = knob(1e-8, gt=0)
    # "bf16" computes with bfloat16 weights and keeps float32 master weights and Adam moments in
    # the optimiser (see rlhf_cli.ppo.precision); "fp32" trains as legacy TRL does.
    # The command line also takes "auto" (AUTO_PRECISION), resolved before the engine is built.
    precision: str = knob("fp32", choices=PRECISIONS, command_line_choices=(*PRECISIONS, AUTO_PRECISION))
    # Ours: "fsdp2" shards policy, value head, reference and optimiser state over the processes with
    # FSDP2 (rlhf_cli.ppo.sharding); "none" keeps a whole copy per process (DDP).
    sharding: str = knob("none", choices=SHARDINGS)

    # Set by the command line from other groups.
    seed: int = knob(0, ge=0)
    # Responses per prompt (G): step() takes its samples in prompt-major order, the G responses of each
    # prompt next to each other; batch_size counts responses and must be a multiple of G, so a group
    # never straddles two processes or two steps.
    samples_per_prompt: int = knob(1, ge=1)
    gradient_checkpointing: bool = knob(False)

    @property
    def resolved_mini_batch_size(self) -> int:
        """``mini_batch_size``, or for None the whole batch up to :data:`DEFAULT_MINI_BATCH_SIZE`."""
        return self.mini_batch_size if self.mini_batch_size is not None else default_mini_batch_size(self.batch_size)

    def sizes(self, world_size: int = 1) -> "Sizes":
        """The sizes this engine runs with on ``world_size`` processes."""
        mini = self.resolved_mini_batch_size
        backward = mini * self.gradient_accumulation_steps
        return Sizes(self.batch_size, mini, self.gradient_accumulation_steps, backward, world_size,
                     self.batch_size * world_size, backward * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields of PPOSettings that the command line sets from other groups (not ppo.NAME).
FROM_OTHER_GROUPS = ("seed", "samples_per_prompt", "gradient_checkpointing")


class Sizes(NamedTuple):
    """The sizes a trainer runs with."""

    batch_size: int  # samples per step, per process
    mini_batch_size: int  # samples per forward/backward pass, per process
    gradient_accumulation_steps: int
    backward_batch_size: int  # samples per optimiser step, per process
    world_size: int  # processes
    global_batch_size: int  # samples per step over all processes
    global_backward_batch_size: int  # samples per optimiser step over all processes


def default_mini_batch_size(batch_size: int) -> int:
    """The mini-batch size ``mini_batch_size=None`` stands for: the whole batch, up to 128 (TRL: 128)."""
    return min(batch_size, DEFAULT_MINI_BATCH_SIZE)


def settings_fields() -> tuple[dataclasses.Field, ...]:
    """PPOSettings' fields in declaration order."""
    return dataclasses.fields(PPOSettings)


def ppo_group_fields() -> list[dataclasses.Field]:
    """The fields the command line's ppo group exposes as ``ppo.NAME``, in declaration order."""
    return [f for f in settings_fields() if f.name not in FROM_OTHER_GROUPS]


# The source a refusal names when FSDP2 was chosen by the launcher's config rather than the setting.
FSDP2_LAUNCH = "This FSDP2 launch (Accelerate's fsdp_version: 2)"


def launched_with_fsdp(version: Optional[str] = None) -> bool:
    """Whether `accelerate launch` was given an FSDP config (at ``version``, "1" or "2", when given),
    read from the environment it sets (torch-free: the command line asks before importing torch)."""
    enabled = os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes", "y", "on", "t")
    return enabled and (version is None or os.environ.get("FSDP_VERSION", "1") == version)


def sharding_of_launch(sharding: str) -> tuple[str, str]:
    """The sharding a run uses, and the source a refusal names ("" for the setting itself): an FSDP2
    launch (Accelerate's config at fsdp_version: 2) means ``fsdp2`` whatever the setting says."""
    if sharding != "fsdp2" and launched_with_fsdp("2"):
        return "fsdp2", FSDP2_LAUNCH
    return sharding, ""


@dataclass(frozen=True)
class Launch:
    """What the engine's Accelerator is built with: facts of the launch, not PPO knobs."""

    log_with: Any = None  # tracker name(s) for Accelerate, or None
    tracker_project_name: str = "rlhf_cli"
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    project_kwargs: dict[str, Any] = field(default_factory=dict)  # Accelerate's ProjectConfiguration
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. mixed_precision
