"""The structured schema of ``rlhf reward``'s config (configs/reward.yaml), typo-proof like train's.

It reuses the train schema's sections where the meaning is the same (``model``, ``logging``,
``checkpoint``, reward sources for the baselines) and adds the preference data (``data``) and the
optimisation (``optim``). Defaults are written here once; configs/reward.yaml and configs/data/*.yaml
repeat them with their comments, and the offline default block of reward.yaml is where they deviate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from rlhf_cli.config.schema import CheckpointSection, LoggingSection, ModelConfig, RewardConfig, _field
from rlhf_cli.data.preferences import FORMATS, TIE_MODES

PREFERENCE_SOURCES = ("imdb_pairs", "files", "hub")


@dataclass
class PreferenceDataConfig:
    source: str = _field("imdb_pairs", choices=PREFERENCE_SOURCES)
    path: Optional[str] = None
    name: Optional[str] = None
    data_files: List[str] = _field(factory=list)
    split: str = "train"
    eval_split: Optional[str] = None
    eval_size: int = _field(512, ge=1)
    format: str = _field("auto", choices=FORMATS)
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    margin_column: Optional[str] = "margin"
    tie_column: Optional[str] = "tie"
    ties: str = _field("skip", choices=TIE_MODES)
    max_length: int = _field(512, ge=1)
    max_samples: Optional[int] = _field(None, ge=1)
    shuffle_seed: Optional[int] = None
    train_pairs: int = _field(2000, ge=1)
    prompt_min_tokens: int = _field(2, ge=1)
    prompt_max_tokens: int = _field(8, ge=1)
    response_min_tokens: int = _field(8, ge=1)
    response_max_tokens: int = _field(12, ge=1)


@dataclass
class RewardOptimSection:
    learning_rate: float = _field(1e-5, gt=0)
    batch_size: int = _field(16, ge=1)
    epochs: int = _field(1, ge=1)
    steps: Optional[int] = _field(None, ge=1)
    weight_decay: float = _field(0.0, ge=0)
    adam_eps: float = _field(1e-8, gt=0)
    max_grad_norm: Optional[float] = _field(1.0, gt=0)
    center_rewards_coefficient: float = _field(0.0, ge=0)


@dataclass
class RewardEvalSection:
    baselines: List[RewardConfig] = _field(factory=list)
    batch_size: int = _field(64, ge=1)


@dataclass
class RewardRunConfig:
    model: ModelConfig = _field(factory=ModelConfig)
    data: PreferenceDataConfig = _field(factory=PreferenceDataConfig)
    optim: RewardOptimSection = _field(factory=RewardOptimSection)
    eval: RewardEvalSection = _field(factory=RewardEvalSection)
    logging: LoggingSection = _field(factory=LoggingSection)
    checkpoint: CheckpointSection = _field(factory=CheckpointSection)
    seed: int = _field(0, ge=0)
    output_dir: str = "${hydra:runtime.output_dir}"
    threads: Optional[int] = _field(None, ge=1)
    overwrite: bool = False
