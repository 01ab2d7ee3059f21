"""Configuration: the structured schema, where configs/ and recipes/ live, composition and validation.

``compose_train_config(overrides)`` composes configs/train.yaml exactly as ``rlhf train`` does and
returns the validated, resolved DictConfig. Names are imported lazily so that importing
``rlhf_cli.config.paths`` (``rlhf recipes``) does not import Hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compose_train_config": "rlhf_cli.config.compose",
    "TrainConfig": "rlhf_cli.config.schema",
    "config_dir": "rlhf_cli.config.paths",
    "recipes_dir": "rlhf_cli.config.paths",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_cli.config' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
