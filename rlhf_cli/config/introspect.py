"""Looking things up in the schema by dotted key: which keys a node has, what type a key expects.

Used to turn OmegaConf's errors into suggestions ("valid keys of 'ppo' are ...") without composing
anything, so it works even when composition failed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from functools import lru_cache
from typing import Any

from hydra.conf import HydraConf

from rlhf_cli.config.schema import TrainConfig

_TOKEN = re.compile(r"[^.\[\]]+")


def split_key(full_key: str) -> list[str]:
    """``'reward.components[0].weight'`` -> ``['reward', 'components', '0', 'weight']``."""
    return _TOKEN.findall(full_key)


def join_key(parts: list[str]) -> str:
    """Dotted key as written on the command line: ``['reward', 'components', '0']`` -> ``'reward.components.0'``."""
    return ".".join(parts)


def _unwrap(hint: Any) -> Any:
    """Optional[X] -> X; List[X] / Dict[str, X] keep their origin."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


@lru_cache(maxsize=None)
def _hints(dc_type: type) -> dict[str, Any]:
    return typing.get_type_hints(dc_type)


def root_hints(schema: type = TrainConfig) -> dict[str, Any]:
    """The root's keys: the command's schema (``rlhf train``'s by default) plus Hydra's own node."""
    return {**_hints(schema), "hydra": HydraConf}


def hint_at(parts: list[str], schema: type = TrainConfig) -> Any | None:
    """The type annotation of the key at ``parts`` in ``schema`` (None when the path leaves it)."""
    hint: Any = schema
    for i, part in enumerate(parts):
        hint = _unwrap(hint)
        origin = typing.get_origin(hint)
        if origin in (list, tuple) and part.isdigit():
            hint = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        elif origin is dict:
            hint = typing.get_args(hint)[1] if typing.get_args(hint) else Any
        elif dataclasses.is_dataclass(hint):
            hints = root_hints(schema) if i == 0 else _hints(hint)
            if part not in hints:
                return None
            hint = hints[part]
        else:
            return None
    return hint


def keys_at(parts: list[str], schema: type = TrainConfig) -> list[str] | None:
    """Field names of the structured node at ``parts`` (None if it is not a structured node)."""
    hint = _unwrap(hint_at(parts, schema))
    if not parts:
        return list(root_hints(schema))
    if dataclasses.is_dataclass(hint):
        return list(_hints(hint))
    return None


@lru_cache(maxsize=None)
def leaf_paths(schema: type = TrainConfig) -> tuple[str, ...]:
    """Every dotted key of ``schema`` (not Hydra's), e.g. ``ppo.learning_rate``."""
    out: list[str] = []

    def walk(dc_type: type, prefix: str) -> None:
        for name, hint in _hints(dc_type).items():
            key = f"{prefix}{name}"
            out.append(key)
            inner = _unwrap(hint)
            if dataclasses.is_dataclass(inner):
                walk(inner, key + ".")

    walk(schema, "")
    return tuple(out)


def describe_type(hint: Any) -> str:
    """Plain words for a type annotation: 'an integer', 'a number or null', ..."""
    nullable = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    inner = _unwrap(hint)
    origin = typing.get_origin(inner)
    if inner is bool:
        words = "true or false"
    elif inner is int:
        words = "an integer"
    elif inner is float:
        words = "a number"
    elif inner is str:
        words = "a string"
    elif origin in (list, tuple):
        (item,) = typing.get_args(inner) or (Any,)
        words = f"a list ([a,b,...]) of {describe_type(item).removeprefix('a ').removeprefix('an ')}s"
    elif origin is dict:
        words = "a mapping ({key: value, ...})"
    elif dataclasses.is_dataclass(inner):
        words = f"a '{inner.__name__}' section"
    else:
        words = "a value"
    return f"{words} or null" if nullable else words
