"""Building the reward function named by the ``reward`` config node."""

from __future__ import annotations

import math
from typing import Any

from rlhf_cli.choices import REWARD_SOURCE_TYPES as SOURCE_TYPES
from rlhf_cli.choices import REWARD_TYPES
from rlhf_cli.errors import RewardError
from rlhf_cli.rewards.base import RewardFunction, describe


def build_reward(cfg: Any) -> RewardFunction:
    """The reward function for ``cfg`` (a RewardConfig: DictConfig or dataclass, read by attribute)."""
    if cfg.type == "weighted_sum":
        return _weighted_sum(cfg)
    if cfg.type in SOURCE_TYPES and len(cfg.components) > 0:
        raise RewardError(
            f"reward.components is only used with reward.type=weighted_sum, but reward.type={cfg.type}. "
            f"Set reward.type=weighted_sum to combine them, or remove reward.components."
        )
    return _source(cfg, "reward", REWARD_TYPES)


def build_reward_source(cfg: Any, prefix: str) -> RewardFunction:
    """One non-composite source (vader, classifier, callable, learned) from the node at config path ``prefix``
    (e.g. a ``reward.monitor`` entry)."""
    return _source(cfg, prefix, SOURCE_TYPES)


def _source(cfg: Any, prefix: str, valid_types: tuple[str, ...]) -> RewardFunction:
    """One non-composite source from a RewardSourceConfig at config path ``prefix``."""
    if cfg.type == "vader":
        from rlhf_cli.rewards.lexicon import VaderReward

        return VaderReward(text=cfg.text, config_prefix=prefix)
    if cfg.type == "classifier":
        from rlhf_cli.rewards.classifier import ClassifierReward

        if not cfg.model:
            raise RewardError(
                f"{prefix}.type=classifier needs {prefix}.model=<Hub id or local directory of a text-classification "
                f"model> (e.g. lvwerra/distilbert-imdb, or a directory written by save_pretrained)."
            )
        return ClassifierReward(
            model=cfg.model,
            label=cfg.label,
            output=cfg.output,
            batch_size=cfg.batch_size,
            device=cfg.device,
            max_length=cfg.max_length,
            text=cfg.text,
            config_prefix=prefix,
        )
    if cfg.type == "callable":
        from rlhf_cli.rewards.python_callable import CallableReward

        if not cfg.function:
            raise RewardError(
                f"{prefix}.type=callable needs {prefix}.function='package.module:function' or "
                f"'path/to/file.py:function' (e.g. rlhf_cli.rewards.examples:length_penalty)."
            )
        return CallableReward(cfg.function, _plain_dict(cfg.kwargs), config_prefix=prefix)
    if cfg.type == "learned":
        from rlhf_cli.rewards.learned import LearnedReward

        if not cfg.model:
            raise RewardError(
                f"{prefix}.type=learned needs {prefix}.model=<the output_dir of a `rlhf reward` run, or its final/ "
                f"directory> (e.g. `rlhf reward output_dir=runs/rm`, then {prefix}.model=runs/rm)."
            )
        return LearnedReward(cfg.model, batch_size=cfg.batch_size, device=cfg.device, config_prefix=prefix)
    raise RewardError(f"Unknown {prefix}.type '{cfg.type}'; valid types are {', '.join(valid_types)}.")


def _weighted_sum(cfg: Any) -> RewardFunction:
    from rlhf_cli.rewards.weighted import WeightedSumReward

    components = list(cfg.components)
    if not components:
        raise RewardError(
            "reward.type=weighted_sum needs reward.components=[{type: vader, weight: 1.0}, ...] "
            "(each component a vader, classifier or callable source with a weight)."
        )
    parts = []
    for index, component in enumerate(components):
        prefix = f"reward.components[{index}]"
        if component.type == "weighted_sum":
            raise RewardError(
                f"{prefix}.type=weighted_sum: weighted sums cannot be nested. List its parts directly in "
                f"reward.components with their weights multiplied out."
            )
        weight = component.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"{prefix}.weight={weight!r} must be a finite number.")
        fn = _source(component, prefix, SOURCE_TYPES)
        parts.append((float(weight), fn, describe(fn)))
    return WeightedSumReward(parts)


def _plain_dict(kwargs: Any) -> dict:
    """``kwargs`` as a plain dict of plain values (OmegaConf containers resolved and converted)."""
    from omegaconf import DictConfig, OmegaConf

    if kwargs is None:
        return {}
    if isinstance(kwargs, DictConfig):
        return OmegaConf.to_container(kwargs, resolve=True)
    return dict(kwargs)
