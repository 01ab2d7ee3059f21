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

from rlhf_cli.algo.names import estimator_named
from rlhf_cli.ppo.rules import LIBRARY, check_settings
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
    # TRL's default: trackers (and their directories) keep the project name a TRL script logged under.
    tracker_project_name: str = "trl"
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
    sharding: str = _default("sharding")

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
        self.check()

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
        return self.settings().sizes(world_size)

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
        self.check()
        return PPOSettings(**{f.name: getattr(self, f.name) for f in settings_fields()})

    # Checks ----------------------------------------------------------------------------------
    def check(self) -> None:
        """ValueError naming the fields and the fix when the settings break one of the engine's rules
        (:func:`rlhf_cli.ppo.rules.check_settings`: ranges, sizes, groups, precision, scores)."""
        values = {f.name: getattr(self, f.name) for f in settings_fields()}
        # is_peft_model is known once the trainer has its model (None before: not checked until then).
        values.update(mixed_precision=self.accelerator_kwargs.get("mixed_precision"), peft_model=self.is_peft_model)
        check_settings(values, LIBRARY)

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs the value head (only ``gae`` does)."""
        return estimator_named(self.advantage_estimator).needs_critic


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
