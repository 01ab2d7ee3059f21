"""PPOConfig: legacy TRL 0.11.4's PPOConfig, field for field (DESIGN §6).

Sizes here are per process, as in legacy TRL: ``batch_size`` samples go into each call of
``PPOTrainer.step`` on each process. The command line speaks in global sizes and divides them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from rlhf_cli.ppo.estimators import ADVANTAGE_ESTIMATORS, estimator_named, estimators_without_groups

# The per-token KL estimates of the penalty (the one declaration; the schema and ppo.functional import it).
KL_PENALTY_MODES = ("kl", "abs", "mse", "full")
# The weights the policy computes with (the one declaration; see rlhf_cli.ppo.precision).
PRECISIONS = ("fp32", "bf16")
# How the policy is spread over processes (the one declaration; see rlhf_cli.ppo.sharding).
SHARDINGS = ("none", "fsdp2")
# Estimators of KL(π‖π_ref) from sampled tokens for the KL *loss* term (Schulman, "Approximating KL
# Divergence", 2020; see rlhf_cli.ppo.functional.kl_loss_terms). k3 is GRPO's.
KL_LOSS_ESTIMATORS = ("k1", "k2", "k3")
DEFAULT_MINI_BATCH_SIZE = 128
# Fields that are not knobs of the command line's ppo group (every other field is one, with the
# default written below; see rlhf_cli/config/schema.py): TRL's bookkeeping and the fields the run
# fills in from elsewhere (seed, trackers, model, launch) or derives from the sizes.
LIBRARY_ONLY_FIELDS = frozenset({
    # experiment bookkeeping and tracker plumbing: the run sets these from seed / logging.*
    "exp_name", "seed", "log_with", "task_name", "model_name", "query_dataset", "reward_model",
    "remove_unused_columns", "tracker_kwargs", "accelerator_kwargs", "project_kwargs",
    "tracker_project_name", "push_to_hub_if_best_kwargs", "steps", "compare_steps",
    # a knob of the command line's generation group (generation.samples_per_prompt), not of ppo
    "samples_per_prompt",
    # accepted for TRL scripts without effect
    "optimize_cuda_cache", "optimize_device_cache", "dataset_num_proc",
    # set from model.* or filled in by the trainer
    "gradient_checkpointing", "is_encoder_decoder", "is_peft_model",
    # derived sizes
    "world_size", "backward_batch_size", "global_backward_batch_size", "global_batch_size",
})
# The fields the other sizes derive from: assigning one of them refreshes the derived ones.
_SIZE_FIELDS = ("batch_size", "mini_batch_size", "gradient_accumulation_steps")


class Sizes(NamedTuple):
    """The sizes a trainer runs with, derived from a config when the trainer is built."""

    batch_size: int  # samples per step, per process
    mini_batch_size: int  # samples per forward/backward pass, per process
    gradient_accumulation_steps: int
    backward_batch_size: int  # samples per optimiser step, per process
    world_size: int  # processes
    global_batch_size: int  # samples per step over all processes
    global_backward_batch_size: int  # samples per optimiser step over all processes


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
    seed: int = 0
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

    # The knobs of the command line's ppo group, in the order `rlhf train --cfg job` shows them
    # (every field not in LIBRARY_ONLY_FIELDS is one; see rlhf_cli/config/schema.py).
    learning_rate: float = 1.41e-5
    # sizes (per process here; global on the command line)
    batch_size: int = 128
    mini_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    # samples per no-gradient forward pass (old logprobs/values, reference); None: the whole batch
    forward_batch_size: Optional[int] = None

    # Advantages: "gae" (PPO with a value head, TRL's), or a critic-free estimator of
    # rlhf_cli.ppo.advantages ("grpo", "rloo", "reinforce_pp"): no value head is run or trained.
    advantage_estimator: str = "gae"
    # grpo: divide by the group's reward std (GRPO); False: only subtract the group mean (Dr. GRPO).
    grpo_scale_by_std: bool = True

    # KL penalty and its controller
    # Put −β·KL into the per-token rewards (TRL's PPO; β from the controller below). False: no
    # reward-side penalty (β reported as 0); use kl_loss_coef to keep the policy near the reference.
    kl_in_reward: bool = True
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
    target: float = 6.0
    horizon: float = 10000.0
    # Weight of a KL(π‖π_ref) term added to the loss (GRPO's way; 0: none), estimated per token by
    # kl_loss_estimator from the sampled tokens.
    kl_loss_coef: float = 0.0
    kl_loss_estimator: str = "k3"

    # advantages and losses
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: Optional[float] = None

    early_stopping: bool = False
    target_kl: float = 1.0
    ratio_threshold: float = 10.0

    # scores and rewards
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: Optional[float] = None
    whiten_rewards: bool = False

    # Deliberate difference from legacy TRL: dropout makes old and new logprobs disagree on the
    # same weights, so it is switched off in policy, value head and reference during PPO.
    disable_dropout: bool = True

    # optimiser
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    # Ours: "bf16" computes with bfloat16 weights and keeps float32 master weights and Adam moments in
    # the optimiser (see rlhf_cli.ppo.precision); "fp32" trains as legacy TRL does.
    precision: str = "fp32"
    # Ours: "fsdp2" shards policy, value head, reference and optimiser state over the processes with
    # FSDP2 (rlhf_cli.ppo.sharding); "none" keeps a whole copy per process (DDP).
    sharding: str = "none"

    # Library-only fields (LIBRARY_ONLY_FIELDS): accepted for TRL scripts, filled in by the trainer,
    # or derived from the sizes.
    # Responses per prompt (G): step() takes its samples in prompt-major order, the G responses of each
    # prompt next to each other; batch_size counts responses and must be a multiple of G, so a group
    # never straddles two processes or two steps. On the command line: generation.samples_per_prompt.
    samples_per_prompt: int = 1
    world_size: Optional[int] = None
    optimize_cuda_cache: Optional[bool] = None
    optimize_device_cache: bool = False
    compare_steps: int = 1
    gradient_checkpointing: bool = False
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
        if self.sharding not in SHARDINGS:
            raise ValueError(f"PPOConfig.sharding must be one of {', '.join(SHARDINGS)}; got {self.sharding!r}.")
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


def default_mini_batch_size(batch_size: int) -> int:
    """The mini-batch size ``mini_batch_size=None`` stands for: the whole batch, up to 128 (TRL: 128)."""
    return min(batch_size, DEFAULT_MINI_BATCH_SIZE)


def command_line_fields() -> list[dataclasses.Field]:
    """PPOConfig's fields that the command line's ppo group exposes, in declaration order."""
    return [f for f in dataclasses.fields(PPOConfig) if f.name not in LIBRARY_ONLY_FIELDS]


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
