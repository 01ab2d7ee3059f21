"""The one interface every reward source implements, and helpers shared by the sources."""

from __future__ import annotations

import types
from typing import Protocol, Sequence

REWARD_TEXTS = ("response", "full")


class RewardFunction(Protocol):
    """Scores a batch: ``prompts[i]`` and ``responses[i]`` (decoded text) -> one float per sample.

    Returns a sequence of B numbers (list, tuple, NumPy array or 1-D tensor), B = ``len(prompts)``.
    """

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]: ...


def reward_texts(prompts: Sequence[str], responses: Sequence[str], text: str) -> list[str]:
    """The texts a sentiment-style source scores: the responses, or prompt + response ("full").

    "full" concatenates as written: decoded responses carry their own leading space with byte-level
    BPE and with the review tokenizer, and a prompt may end mid-word, so no separator is inserted.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    if text == "response":
        return list(responses)
    if text == "full":
        return [prompt + response for prompt, response in zip(prompts, responses)]
    raise ValueError(f"text must be one of {', '.join(REWARD_TEXTS)}, got {text!r}")


def describe(fn: RewardFunction) -> str:
    """A readable name for messages: our sources' repr, or ``module.function`` for plain functions."""
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{fn.__module__}.{fn.__qualname__}"
    return repr(fn)
