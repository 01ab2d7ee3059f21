"""Errors caused by what the user asked for.

The command line prints these as one paragraph, without a traceback, and exits with
``exit_code``. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class RlhfError(Exception):
    """A problem with the user's input (config, files, reward function, model path).

    The message must say what was wrong and what to change.
    """

    exit_code: int = 2
    # How the command line introduces the message.
    label: str = "Error:"
    # True when another process of the same job prints the message (see rlhf_cli.engine.together).
    quiet: bool = False


class ConfigError(RlhfError, ValueError):
    """The composed configuration is invalid or inconsistent."""


class DataError(RlhfError, ValueError):
    """The prompt dataset cannot be loaded or is unusable."""


class RewardError(RlhfError, ValueError):
    """The reward source cannot be built or returned unusable scores."""


class ModelLoadError(RlhfError, ValueError):
    """A model or tokenizer cannot be loaded (missing path, Hub unreachable offline)."""
