"""The structured schema of the training config (the pinned field names every module consumes).

Hydra merges configs/train.yaml and its groups into these dataclasses, so a misspelt key or a value of
the wrong type fails at composition. OmegaConf never instantiates the dataclasses (it only reads their
fields), so ``__post_init__`` would not run: enumerations and ranges are declared here as field metadata
(``choices``, ``ge``, ``gt``, ``le``, ``pattern``) and checked by :func:`rlhf_cli.config.validate.validate`
right after composition.

Where each default is written (one rule: a value is written once, by its owner)
---------------------------------------------------------------------------------
* The ppo group belongs to the engine. :data:`PPOSection` is *generated* from
  :class:`rlhf_cli.ppo.settings.PPOSettings` (every ``ppo.NAME`` field, with its type, default and
  range), plus the run-only ``mixed_precision``; ``seed``, ``generation.samples_per_prompt`` and
  ``model.gradient_checkpointing`` take their defaults from there too. configs/ppo/default.yaml
  therefore writes no value, only what each key means. A new PPO knob is one new PPOSettings field:
  settable as ``ppo.NAME=...``, shown by ``rlhf train --cfg job``, passed to the engine.
* The other sections have no library twin: their defaults are written here and the group YAML files
  repeat them with their comments (tests/cli/test_compose.py pins the two equal).
* The offline default (a bare ``rlhf train`` that finishes in minutes on a CPU) is the one named place
  for deviations from TRL's values: the "Offline default" block at the end of configs/train.yaml.
  Recipes are deltas on top of it and set back only what that block changed.
* Each enumeration (KL modes, trackers, ...) is declared once, here or by its owner, and imported:
  the math's in ``rlhf_cli.algo.names``, those the model and reward builders read in ``rlhf_cli.choices``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rlhf_cli.algo.names import KL_PENALTY_MODES
from rlhf_cli.choices import DTYPES, REWARD_SOURCE_TYPES, REWARD_TYPES
from rlhf_cli.ppo.rules import command_line_limits
from rlhf_cli.ppo.settings import PPOSettings, ppo_group_fields


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


def _engine_field(name: str) -> Any:
    """A field the command line sets from a group other than ppo, with the engine setting's default and range."""
    setting = next(f for f in dataclasses.fields(PPOSettings) if f.name == name)
    return field(default=setting.default, metadata=setting.metadata)


MODEL_SOURCES = ("pretrained", "review_gpt2", "tiny_gpt2")
MODEL_KINDS = ("causal", "seq2seq")
PADDING_SIDES = ("left", "right")
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
    gradient_checkpointing: bool = _engine_field("gradient_checkpointing")
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
    # Sources logged (env/monitor/<name>_mean) and reported before/after, never optimised.
    monitor: List[RewardSourceConfig] = _field(factory=list)


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


# Knobs of the ppo group that the engine's settings do not have: they go to Accelerate, not to PPO.
_PPO_RUN_FIELDS = [
    ("mixed_precision", Optional[str], _field(None, choices=MIXED_PRECISIONS)),
]


def _ppo_section() -> type:
    """The ppo group's dataclass, generated from PPOSettings: one field per ``ppo.NAME`` knob
    (:func:`rlhf_cli.ppo.settings.ppo_group_fields`) with its type, default and range, plus
    :data:`_PPO_RUN_FIELDS`. Adding a field to PPOSettings adds the knob here, to ``--cfg job`` and
    to the run's settings (``engine.components``)."""
    hints = typing.get_type_hints(PPOSettings)
    fields = [(f.name, hints[f.name], field(default=f.default, metadata=command_line_limits(f.metadata)))
              for f in ppo_group_fields()]
    section = dataclasses.make_dataclass("PPOSection", fields + _PPO_RUN_FIELDS)
    section.__module__ = __name__
    section.__doc__ = "The ppo group: the engine's knobs with TRL's defaults (sizes global), plus mixed_precision."
    return section


PPOSection = _ppo_section()


@dataclass
class GenerationSection:
    response_min_tokens: int = _field(4, ge=1)
    response_max_tokens: int = _field(16, ge=1)
    top_k: int = _field(0, ge=0)
    top_p: float = _field(1.0, gt=0, le=1)
    temperature: float = _field(1.0, gt=0)
    do_sample: bool = True
    # The engine's samples_per_prompt: its default and range written there.
    samples_per_prompt: int = _engine_field("samples_per_prompt")
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
    seed: int = _engine_field("seed")
    steps: int = _field(100, ge=1)
    epochs: Optional[int] = _field(None, ge=1)
    output_dir: str = "${hydra:runtime.output_dir}"
    eval_prompts: int = _field(128, ge=0)
    threads: Optional[int] = _field(None, ge=1)
    overwrite: bool = False
