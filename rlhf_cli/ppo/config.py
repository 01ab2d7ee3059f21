"""PPOConfig: every knob of legacy TRL's PPOConfig that matters for training (DESIGN §6).

Sizes here are per process, as in legacy TRL: ``batch_size`` samples go into each call of
``PPOTrainer.step`` on each process. The command line speaks in global sizes and divides them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

KL_PENALTY_MODES = ("kl", "abs", "mse", "full")
DEFAULT_MINI_BATCH_SIZE = 128


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO with a KL penalty to a reference model.

    Defaults are legacy TRL's. ``mini_batch_size=None`` means "the whole batch, up to 128",
    so ``PPOConfig(batch_size=1)`` works (legacy TRL rejects it).
    """

    # experiment
    exp_name: str = "rlhf_cli"
    seed: int = 0
    log_with: Optional[str] = None
    tracker_project_name: str = "rlhf_cli"
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict)
    project_kwargs: dict[str, Any] = field(default_factory=dict)

    # optimisation
    learning_rate: float = 1.41e-5
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None

    # sizes (per process)
    batch_size: int = 128
    mini_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    # samples per no-gradient forward pass (old logprobs/values, reference); None: the whole batch
    forward_batch_size: Optional[int] = None

    # KL penalty and its controller
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
    target: float = 6.0
    horizon: float = 10000.0

    # advantages and losses
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ratio_threshold: float = 10.0
    early_stopping: bool = False
    target_kl: float = 1.0

    # scores and rewards
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: Optional[float] = None
    whiten_rewards: bool = False

    # Deliberate difference from legacy TRL: dropout makes old and new logprobs disagree on the
    # same weights, so it is switched off in policy, value head and reference during PPO.
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.mini_batch_size is None:
            self.mini_batch_size = min(self.batch_size, DEFAULT_MINI_BATCH_SIZE) if self.batch_size > 0 else 1
        self._validate()

    # Derived sizes -------------------------------------------------------------------------
    @property
    def backward_batch_size(self) -> int:
        """Samples per optimiser step: mini_batch_size × gradient_accumulation_steps."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def num_mini_batches(self) -> int:
        """Mini-batches per PPO epoch."""
        return self.batch_size // self.mini_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Checks ----------------------------------------------------------------------------------
    def _validate(self) -> None:
        positive_ints = ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}.")
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise ValueError(f"PPOConfig.forward_batch_size must be positive or None, got {self.forward_batch_size!r}.")
        if self.batch_size % self.backward_batch_size != 0:
            raise ValueError(
                f"PPOConfig sizes disagree: batch_size={self.batch_size} is not divisible by "
                f"mini_batch_size × gradient_accumulation_steps = {self.mini_batch_size} × "
                f"{self.gradient_accumulation_steps} = {self.backward_batch_size}. Choose a mini_batch_size and "
                f"gradient_accumulation_steps whose product divides batch_size."
            )
        if self.kl_penalty not in KL_PENALTY_MODES:
            raise ValueError(f"PPOConfig.kl_penalty must be one of {', '.join(KL_PENALTY_MODES)}; got {self.kl_penalty!r}.")
        for name in ("learning_rate", "target", "horizon", "target_kl", "ratio_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be positive, got {getattr(self, name)!r}.")
        for name in ("cliprange", "cliprange_value", "vf_coef", "init_kl_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must not be negative, got {getattr(self, name)!r}.")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}.")
        if self.score_clip is not None and self.score_clip <= 0:
            raise ValueError(f"PPOConfig.score_clip must be positive or None, got {self.score_clip!r}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"PPOConfig.max_grad_norm must be positive or None, got {self.max_grad_norm!r}.")
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("PPOConfig.use_score_norm=True needs use_score_scaling=True (normalisation uses the running moments).")
