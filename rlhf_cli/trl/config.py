"""PPOConfig: legacy TRL 0.11.4's PPOConfig, field for field, over the engine's settings.

Sizes here are per process, as in legacy TRL: ``batch_size`` samples go into each call of
``PPOTrainer.step`` on each process. Every knob the engine reads takes its default from
:class:`rlhf_cli.ppo.settings.PPOSettings` (written there once); :meth:`PPOConfig.settings` converts
the config, as it is when a trainer is built, into those frozen settings.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from rlhf_cli.algo.names import ADVANTAGE_ESTIMATORS, KL_LOSS_ESTIMATORS, KL_PENALTY_MODES, PRECISIONS
from rlhf_cli.algo.names import estimator_named, estimators_without_groups
from rlhf_cli.ppo.settings import PPOSettings, Sizes, default_mini_batch_size, settings_fields

_DEFAULTS = PPOSettings()
# The fields the other sizes derive from: assigning one of them refreshes the derived ones.
_SIZE_FIELDS = ("batch_size", "mini_batch_size", "gradient_accumulation_steps")


def _default(name: str) -> Any:
    """The engine's default of knob ``name`` (PPOSettings writes each default once)."""
    return getattr(_DEFAULTS, name)


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO with a KL penalty to a reference model: every field of legacy TRL 0.11.4's
    ``PPOConfig`` (a TRL script's keywords all work), with TRL's defaults.

    Derived sizes follow the config as it is: ``mini_batch_size=None`` means "the whole batch, up to
    128" (so ``PPOConfig(batch_size=1)`` works; legacy TRL rejects it) and is recomputed when
    ``batch_size`` changes; ``backward_batch_size`` (mini × accumulation) is recomputed when any size
    changes; the trainer checks the sizes again when it is built from the config.

    Filled in by :class:`~rlhf_cli.PPOTrainer` when it is built, as in TRL (passing them has no
    effect): ``world_size``, ``global_batch_size``, ``global_backward_batch_size``,
    ``is_encoder_decoder``, ``is_peft_model``.

    Accepted for TRL scripts but without effect here: ``task_name``, ``model_name``, ``query_dataset``,
    ``reward_model`` (bookkeeping only: stored and sent to the trackers with :meth:`to_dict`);
    ``steps`` (only gives :attr:`total_ppo_epochs`; you write the training loop);
    ``push_to_hub_if_best_kwargs`` and ``compare_steps`` (no Hub pushes: a warning if set);
    ``optimize_cuda_cache``/``optimize_device_cache`` (memory is freed by scope, not by emptying
    caches); ``dataset_num_proc`` (PPOTrainer maps no dataset).

    Used as in TRL: ``remove_unused_columns`` (a ``datasets.Dataset`` given to the trainer keeps only
    the model's forward arguments plus ``label``, ``query``, ``response``), ``gradient_checkpointing``.

    Different from TRL on purpose: ``forward_batch_size`` sets the samples per no-gradient forward
    pass (TRL deprecated it as an alias of ``mini_batch_size``); ``disable_dropout`` (ours) switches
    dropout off during PPO; ``precision="bf16"`` (ours) trains with bfloat16 weights and float32
    master weights (:mod:`rlhf_cli.ppo.precision`).
    """

    # experiment
    exp_name: str = "rlhf_cli"
    seed: int = _default("seed")
    log_with: Optional[str] = None
    task_name: Optional[str] = None
    model_name: Optional[str] = "gpt2"
    query_dataset: Optional[str] = "stanfordnlp/imdb"
    reward_model: Optional[str] = "sentiment-analysis:lvwerra/distilbert-imdb"
    remove_unused_columns: bool = True
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict)
    project_kwargs: dict[str, Any] = field(default_factory=dict)
    tracker_project_name: str = "rlhf_cli"
    push_to_hub_if_best_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 20000

    # The engine's knobs: meanings, defaults and ranges in rlhf_cli.ppo.settings.PPOSettings.
    learning_rate: float = _default("learning_rate")
    batch_size: int = _default("batch_size")
    mini_batch_size: Optional[int] = _default("mini_batch_size")
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps")
    ppo_epochs: int = _default("ppo_epochs")
    forward_batch_size: Optional[int] = _default("forward_batch_size")
    advantage_estimator: str = _default("advantage_estimator")
    grpo_scale_by_std: bool = _default("grpo_scale_by_std")
    kl_in_reward: bool = _default("kl_in_reward")
    adap_kl_ctrl: bool = _default("adap_kl_ctrl")
    init_kl_coef: float = _default("init_kl_coef")
    kl_penalty: str = _default("kl_penalty")
    target: float = _default("target")
    horizon: float = _default("horizon")
    kl_loss_coef: float = _default("kl_loss_coef")
    kl_loss_estimator: str = _default("kl_loss_estimator")
    gamma: float = _default("gamma")
    lam: float = _default("lam")
    cliprange: float = _default("cliprange")
    cliprange_value: float = _default("cliprange_value")
    vf_coef: float = _default("vf_coef")
    max_grad_norm: Optional[float] = _default("max_grad_norm")
    early_stopping: bool = _default("early_stopping")
    target_kl: float = _default("target_kl")
    ratio_threshold: float = _default("ratio_threshold")
    use_score_scaling: bool = _default("use_score_scaling")
    use_score_norm: bool = _default("use_score_norm")
    score_clip: Optional[float] = _default("score_clip")
    whiten_rewards: bool = _default("whiten_rewards")
    disable_dropout: bool = _default("disable_dropout")
    weight_decay: float = _default("weight_decay")
    adam_eps: float = _default("adam_eps")
    precision: str = _default("precision")

    # Accepted for TRL scripts, filled in by the trainer, or derived from the sizes (samples_per_prompt
    # and gradient_checkpointing are engine knobs too).
    samples_per_prompt: int = _default("samples_per_prompt")
    world_size: Optional[int] = None
    optimize_cuda_cache: Optional[bool] = None
    optimize_device_cache: bool = False
    compare_steps: int = 1
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    is_encoder_decoder: Optional[bool] = None
    is_peft_model: Optional[bool] = None
    backward_batch_size: Optional[int] = None
    global_backward_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    dataset_num_proc: Optional[int] = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "mini_batch_size":
            # None asks for the automatic size; remember that, so a later batch_size follows.
            object.__setattr__(self, "_auto_mini_batch", value is None)
        object.__setattr__(self, name, value)
        if name in _SIZE_FIELDS and "gradient_accumulation_steps" in self.__dict__:
            self._refresh_sizes()

    def __post_init__(self) -> None:
        if self.optimize_cuda_cache is not None and self.optimize_device_cache:
            raise ValueError("PPOConfig got both optimize_cuda_cache and optimize_device_cache; pass only optimize_device_cache.")
        if self.push_to_hub_if_best_kwargs:
            warnings.warn(
                "PPOConfig.push_to_hub_if_best_kwargs has no effect in rlhf_cli (it never pushes to the Hub); "
                "save the model yourself with model.save_pretrained(...) when its reward is best.",
                UserWarning,
                stacklevel=3,
            )
        self._refresh_sizes()
        self.check_sizes()
        self._validate()

    # Derived sizes -------------------------------------------------------------------------
    def _refresh_sizes(self) -> None:
        """Recompute the automatic mini-batch size and ``backward_batch_size`` from the current sizes."""
        batch, accumulation = self.batch_size, self.gradient_accumulation_steps
        if self.__dict__.get("_auto_mini_batch", False) and _is_positive_int(batch):
            object.__setattr__(self, "mini_batch_size", default_mini_batch_size(batch))
        if _is_positive_int(self.mini_batch_size) and _is_positive_int(accumulation):
            object.__setattr__(self, "backward_batch_size", self.mini_batch_size * accumulation)

    def sizes(self, world_size: int = 1) -> Sizes:
        """The sizes of this config as it is now, checked, for ``world_size`` processes."""
        self._refresh_sizes()
        self.check_sizes()
        return Sizes(
            batch_size=self.batch_size,
            mini_batch_size=self.mini_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            backward_batch_size=self.backward_batch_size,
            world_size=world_size,
            global_batch_size=self.batch_size * world_size,
            global_backward_batch_size=self.backward_batch_size * world_size,
        )

    @property
    def num_mini_batches(self) -> int:
        """Mini-batches per PPO epoch."""
        return self.batch_size // self.mini_batch_size

    @property
    def total_ppo_epochs(self) -> int:
        """TRL's ``ceil(steps / batch_size)``."""
        return int(math.ceil(self.steps / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def settings(self) -> PPOSettings:
        """The engine's frozen settings from this config as it is now, checked."""
        self._refresh_sizes()
        self.check_sizes()
        self._validate()
        return PPOSettings(**{f.name: getattr(self, f.name) for f in settings_fields()})

    # Checks ----------------------------------------------------------------------------------
    def check_sizes(self) -> None:
        """Raise ValueError naming the numbers when the sizes are not positive or do not divide."""
        for name in ("batch_size", *_SIZE_FIELDS[1:], "ppo_epochs"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}.")
        group = self.samples_per_prompt
        if not _is_positive_int(group):
            raise ValueError(f"PPOConfig.samples_per_prompt must be a positive integer, got {group!r}.")
        if self.batch_size % group != 0:
            raise ValueError(
                f"PPOConfig sizes disagree: batch_size={self.batch_size} (responses per step, per process) is not "
                f"divisible by samples_per_prompt={group}: a prompt's group of {group} responses would straddle "
                f"two processes or two steps. Choose a batch_size that is a multiple of {group}."
            )
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % backward != 0:
            raise ValueError(
                f"PPOConfig sizes disagree: batch_size={self.batch_size} is not divisible by "
                f"mini_batch_size × gradient_accumulation_steps = {self.mini_batch_size} × "
                f"{self.gradient_accumulation_steps} = {backward}. Choose a mini_batch_size and "
                f"gradient_accumulation_steps whose product divides batch_size."
            )

    def _validate(self) -> None:
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise ValueError(f"PPOConfig.forward_batch_size must be positive or None, got {self.forward_batch_size!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"PPOConfig.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}.")
        if self.precision == "bf16" and self.accelerator_kwargs.get("mixed_precision") not in (None, "no"):
            raise ValueError(
                "PPOConfig.precision='bf16' already computes in bfloat16; drop mixed_precision from "
                "accelerator_kwargs (or use precision='fp32' with Accelerate's mixed precision)."
            )
        self.check_estimator()
        if self.kl_penalty not in KL_PENALTY_MODES:
            raise ValueError(f"PPOConfig.kl_penalty must be one of {', '.join(KL_PENALTY_MODES)}; got {self.kl_penalty!r}.")
        for name in ("learning_rate", "target", "horizon", "target_kl", "ratio_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be positive, got {getattr(self, name)!r}.")
        for name in ("cliprange", "cliprange_value", "vf_coef", "init_kl_coef", "weight_decay", "kl_loss_coef"):
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

    def check_estimator(self) -> None:
        """Raise ValueError when the advantage estimator, the KL-loss estimator or the group size is not usable."""
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"PPOConfig.advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}; got {self.advantage_estimator!r}."
            )
        if self.kl_loss_estimator not in KL_LOSS_ESTIMATORS:
            raise ValueError(
                f"PPOConfig.kl_loss_estimator must be one of {', '.join(KL_LOSS_ESTIMATORS)}; got {self.kl_loss_estimator!r}."
            )
        needed = estimator_named(self.advantage_estimator).min_group_size
        if self.samples_per_prompt < needed:
            raise ValueError(
                f"PPOConfig.advantage_estimator={self.advantage_estimator!r} compares the responses of one prompt "
                f"with each other and needs samples_per_prompt >= {needed}, got {self.samples_per_prompt}: a "
                f"group of one has no spread (its advantage would be 0 or undefined). Set samples_per_prompt "
                f"to {needed} or more (e.g. 4), or use an advantage_estimator that needs no group: "
                f"{', '.join(estimators_without_groups())}."
            )

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs the value head (only ``gae`` does)."""
        return estimator_named(self.advantage_estimator).needs_critic


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
