"""Closest-match suggestions for misspelt keys, options and values."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from rlhf_cli.config.introspect import join_key, keys_at, leaf_paths, split_key
from rlhf_cli.config.store import schema_of
from rlhf_cli.errors import ConfigError


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option most similar to ``word`` (difflib ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" Did you mean 'x'?" or "" when nothing is close."""
    match = closest(word, options)
    return f" Did you mean '{match}'?" if match else ""


def unknown_key_error(full_key: str, where: str = "", command: str = "train") -> ConfigError:
    """The error for a key the schema of ``rlhf COMMAND``'s config does not have: its node's valid
    keys and the closest one."""
    schema = schema_of(command)
    parts = split_key(full_key)
    parent, leaf = parts[:-1], parts[-1]
    valid = keys_at(parent, schema) or []
    node = f"'{join_key(parent)}'" if parent else "the top level"
    listing = f" Valid keys of {node}: {', '.join(valid)}." if valid else ""
    return ConfigError(
        f"Unknown config key '{join_key(parts)}'{where}.{_suggest_key(parent, leaf, valid, schema)}{listing} "
        f"Fix the spelling, or run `rlhf {command} --cfg job` to see every key."
    )


def _suggest_key(parent: list[str], leaf: str, valid: list[str], schema: type) -> str:
    match = closest(leaf, valid)
    if match:
        return f" Did you mean '{join_key(parent + [match])}'?"
    elsewhere = [path for path in leaf_paths(schema) if path.rsplit(".", 1)[-1] == leaf]
    if elsewhere:
        return f" '{leaf}' belongs to another section: {' or '.join(repr(p) for p in elsewhere)}."
    match = closest(join_key(parent + [leaf]), leaf_paths(schema))
    return f" Did you mean '{match}'?" if match else ""
