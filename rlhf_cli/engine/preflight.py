"""The checks of a run that need no model, made before torch and transformers are imported.

A missing or empty data file and a reward function that does not import (or does not take
``(prompts, responses, **kwargs)``) are reported in about a second, like a misspelt key, instead of
after the libraries and the model have loaded. The same checks run again where the data and the
reward are built; they are written once, in ``rlhf_cli.data.sources`` and ``rlhf_cli.rewards``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.data.sources import checked_data_files
from rlhf_cli.rewards.python_callable import CallableReward


def check_without_models(cfg: DictConfig) -> None:
    """DataError or RewardError for the first data file or reward function that cannot be used."""
    if cfg.dataset.source == "files":
        checked_data_files(list(cfg.dataset.data_files))
    sources = [(cfg.reward, "reward")]
    if cfg.reward.type == "weighted_sum":
        sources = [(component, f"reward.components[{i}]") for i, component in enumerate(cfg.reward.components)]
    sources += [(monitor, f"reward.monitor[{i}]") for i, monitor in enumerate(cfg.reward.monitor)]
    for source, prefix in sources:
        if source.type == "callable" and source.function:
            CallableReward(str(source.function), _plain(source.kwargs), config_prefix=prefix)


def _plain(node: object) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
