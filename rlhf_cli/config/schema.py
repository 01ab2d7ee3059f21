"""The structured schema of the training config (the pinned field names every module consumes).

Hydra merges configs/train.yaml and its groups into these dataclasses, so a misspelt key or a value of
the wrong type fails at composition. OmegaConf never instantiates the dataclasses (it only reads their
fields), so ``__post_init__`` would not run: enumerations and ranges are declared here as field metadata
(``choices``, ``ge``, ``gt``, ``le``, ``pattern``) and checked by :func:`rlhf_cli.config.validate.validate`
right after composition.

Where each default is written (one rule: a value is written once, by its owner)
---------------------------------------------------------------------------------
* The ppo group belongs to the library. ``rlhf_cli.ppo.config.PPOConfig`` is legacy TRL's config and
  keeps TRL's defaults for library users; :data:`PPOSection` is *generated* from it (every field not in
  ``ppo.config.LIBRARY_ONLY_FIELDS``, with its type and default), plus the run-only ``mixed_precision``.
  configs/ppo/default.yaml therefore writes no value, only what each key means, and
  ``engine.components.ppo_config_from`` passes the same derived field list back to PPOConfig. A new PPO
  knob is one new PPOConfig field: settable as ``ppo.NAME=...``, shown by ``rlhf train --cfg job``.
  Only the command line's ranges (``_PPO_LIMITS``) are written here.
* The other sections have no library twin: their defaults are written here and the group YAML files
  repeat them with their comments (tests/cli/test_compose.py pins the two equal).
* The offline default (a bare ``rlhf train`` that finishes in minutes on a CPU) is the one named place
  for deviations from TRL's values: the "Offline default" block at the end of configs/train.yaml.
  Recipes are deltas on top of it (DESIGN §5) and set back only what that block changed.
* Each enumeration (KL modes, trackers, ...) is declared once, here or by its owner, and imported.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rlhf_cli.ppo import config as ppo_config
from rlhf_cli.ppo.estimators import ADVANTAGE_ESTIMATORS
from rlhf_cli.ppo.config import KL_LOSS_ESTIMATORS, KL_PENALTY_MODES, PRECISIONS, SHARDINGS


def _field(
    default: Any = None,
    *,
    factory: Any = None,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    pattern: str | None = None,
    pattern_doc: str | None = None,
) -> Any:
    """A dataclass field whose allowed values are recorded in its metadata for ``validate``."""
    meta = {
        key: value
        for key, value in dict(choices=choices, ge=ge, gt=gt, le=le, pattern=pattern, pattern_doc=pattern_doc).items()
        if value is not None
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


MODEL_SOURCES = ("pretrained", "review_gpt2", "tiny_gpt2")
MODEL_KINDS = ("causal", "seq2seq")
DTYPES = ("float32", "bfloat16", "float16", "auto")
PADDING_SIDES = ("left", "right")
REWARD_SOURCE_TYPES = ("vader", "classifier", "callable")
REWARD_TYPES = REWARD_SOURCE_TYPES + ("weighted_sum",)
REWARD_TEXTS = ("response", "full")
REWARD_OUTPUTS = ("logit", "probability")
DATASET_SOURCES = ("imdb_local", "hub", "files")
KL_PENALTIES = KL_PENALTY_MODES
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class TinyGPT2Config:
    """A GPT-2 built from scratch (random init) with a word-level tokenizer trained on local IMDb reviews."""

    n_layer: int = _field(2, ge=1)
    n_head: int = _field(4, ge=1)
    n_embd: int = _field(128, ge=1)
    n_positions: int = _field(128, ge=8)
    vocab_size: int = _field(4000, ge=16)
    init_seed: int = _field(0, ge=0)


@dataclass
class LoraSection:
    """LoRA adapters through PEFT: only the adapters (and the value head) train, and the reference is
    the policy with its adapters disabled, so no second copy of the weights exists."""

    enabled: bool = False
    r: int = _field(8, ge=1)
    alpha: int = _field(16, ge=1)
    dropout: float = _field(0.0, ge=0, le=1)
    target_modules: Optional[List[str]] = None


@dataclass
class ModelConfig:
    source: str = _field("pretrained", choices=MODEL_SOURCES)
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    kind: str = _field("causal", choices=MODEL_KINDS)
    dtype: str = _field("float32", choices=DTYPES)
    trust_remote_code: bool = False
    revision: Optional[str] = None
    gradient_checkpointing: bool = False
    tokenizer_name_or_path: Optional[str] = None
    pad_token: Optional[str] = None
    padding_side: str = _field("left", choices=PADDING_SIDES)
    tiny: TinyGPT2Config = _field(factory=TinyGPT2Config)
    lora: LoraSection = _field(factory=LoraSection)


@dataclass
class RewardSourceConfig:
    type: str = _field("vader", choices=REWARD_SOURCE_TYPES)
    text: str = _field("response", choices=REWARD_TEXTS)
    model: Optional[str] = None
    label: str = "POSITIVE"
    output: str = _field("logit", choices=REWARD_OUTPUTS)
    batch_size: int = _field(16, ge=1)
    device: str = _field("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?", pattern_doc="auto, cpu, mps, cuda or cuda:N")
    max_length: int = _field(512, ge=1)
    function: Optional[str] = None
    kwargs: Dict[str, Any] = _field(factory=dict)


@dataclass
class RewardComponentConfig(RewardSourceConfig):
    weight: float = 1.0


@dataclass
class RewardConfig(RewardSourceConfig):
    # Redeclared (same position in the field order) to allow weighted_sum at the top level only.
    type: str = _field("vader", choices=REWARD_TYPES)
    components: List[RewardComponentConfig] = _field(factory=list)


@dataclass
class DatasetConfig:
    source: str = _field("imdb_local", choices=DATASET_SOURCES)
    path: Optional[str] = None
    name: Optional[str] = None
    data_files: List[str] = _field(factory=list)
    split: str = "train"
    eval_split: Optional[str] = None
    eval_size: int = _field(16, ge=0)
    text_column: str = "text"
    min_text_chars: int = _field(200, ge=0)
    clean_html: bool = True
    prompt_min_tokens: int = _field(2, ge=1)
    prompt_max_tokens: int = _field(8, ge=1)
    shuffle_seed: Optional[int] = None
    max_samples: Optional[int] = _field(None, ge=1)


# Ranges the command line enforces on the ppo knobs (checked by ``validate``; PPOConfig runs its own
# checks when the run builds it). Values, types and the list of knobs come from PPOConfig.
_PPO_LIMITS: Dict[str, Dict[str, Any]] = {
    "learning_rate": dict(gt=0), "batch_size": dict(ge=1), "forward_batch_size": dict(ge=1),
    "mini_batch_size": dict(ge=1), "gradient_accumulation_steps": dict(ge=1), "ppo_epochs": dict(ge=1),
    "init_kl_coef": dict(ge=0), "kl_penalty": dict(choices=KL_PENALTIES), "target": dict(gt=0),
    "horizon": dict(gt=0), "gamma": dict(ge=0, le=1), "lam": dict(ge=0, le=1), "cliprange": dict(gt=0),
    "cliprange_value": dict(gt=0), "vf_coef": dict(ge=0), "max_grad_norm": dict(gt=0),
    "target_kl": dict(gt=0), "ratio_threshold": dict(gt=0), "score_clip": dict(gt=0),
    "weight_decay": dict(ge=0), "adam_eps": dict(gt=0), "precision": dict(choices=PRECISIONS),
    "sharding": dict(choices=SHARDINGS),
    "advantage_estimator": dict(choices=ADVANTAGE_ESTIMATORS), "kl_loss_coef": dict(ge=0),
    "kl_loss_estimator": dict(choices=KL_LOSS_ESTIMATORS),
}
# Knobs of the ppo group that PPOConfig does not have: they go to Accelerate, not to PPO.
_PPO_RUN_FIELDS = [
    ("mixed_precision", Optional[str], _field(None, choices=MIXED_PRECISIONS)),
]


def _ppo_section() -> type:
    """The ppo group's dataclass, generated from PPOConfig: one field per command-line knob of
    PPOConfig (:func:`rlhf_cli.ppo.config.command_line_fields`) with its type and default, plus
    :data:`_PPO_RUN_FIELDS`. Adding a field to PPOConfig adds the knob here, to ``--cfg job`` and to
    the run's PPOConfig (``engine.components.ppo_config_from``)."""
    hints = typing.get_type_hints(ppo_config.PPOConfig)
    fields = [
        (f.name, hints[f.name], _field(f.default, **_PPO_LIMITS.get(f.name, {})))
        for f in ppo_config.command_line_fields()
    ]
    section = dataclasses.make_dataclass("PPOSection", fields + _PPO_RUN_FIELDS)
    section.__module__ = __name__
    section.__doc__ = "The ppo group: PPOConfig's knobs with TRL's defaults (sizes global), plus mixed_precision."
    return section


PPOSection = _ppo_section()


def _library_default(name: str) -> Any:
    """The default of a PPOConfig field that the command line sets from another group."""
    return next(f.default for f in dataclasses.fields(ppo_config.PPOConfig) if f.name == name)


@dataclass
class GenerationSection:
    response_min_tokens: int = _field(4, ge=1)
    response_max_tokens: int = _field(16, ge=1)
    top_k: int = _field(0, ge=0)
    top_p: float = _field(1.0, gt=0, le=1)
    temperature: float = _field(1.0, gt=0)
    do_sample: bool = True
    # PPOConfig.samples_per_prompt: the library's field, its default written there.
    samples_per_prompt: int = _field(_library_default("samples_per_prompt"), ge=1)
    batch_size: Optional[int] = _field(None, ge=1)


@dataclass
class LoggingSection:
    log_every: int = _field(1, ge=1)
    sample_every: int = _field(10, ge=0)
    sample_rows: int = _field(4, ge=1)
    trackers: List[str] = _field(factory=list, choices=TRACKERS)
    project: str = "rlhf_cli"
    progress: bool = True


@dataclass
class CheckpointSection:
    every: int = _field(0, ge=0)
    keep: int = _field(2, ge=1)
    resume: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = _field(factory=ModelConfig)
    reward: RewardConfig = _field(factory=RewardConfig)
    dataset: DatasetConfig = _field(factory=DatasetConfig)
    ppo: PPOSection = _field(factory=PPOSection)
    generation: GenerationSection = _field(factory=GenerationSection)
    logging: LoggingSection = _field(factory=LoggingSection)
    checkpoint: CheckpointSection = _field(factory=CheckpointSection)
    seed: int = _field(0, ge=0)
    steps: int = _field(100, ge=1)
    epochs: Optional[int] = _field(None, ge=1)
    output_dir: str = "${hydra:runtime.output_dir}"
    eval_prompts: int = _field(128, ge=0)
    threads: Optional[int] = _field(None, ge=1)
    overwrite: bool = False
