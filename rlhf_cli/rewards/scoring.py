"""Calling a reward function and checking what it returned, with messages that point at the sample."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from rlhf_cli.errors import RewardError
from rlhf_cli.rewards.base import RewardFunction, describe

if TYPE_CHECKING:
    import torch

_SHOWN_CHARS = 60  # prompt/response characters quoted in messages


def score_responses(fn: RewardFunction, prompts: list[str], responses: list[str]) -> "torch.Tensor":
    """``fn`` called once on the whole batch, checked, as a float32 CPU tensor [B].

    Raises RewardError if ``fn`` raises (naming the first sample that fails alone), returns anything
    but B numbers (bools are not numbers), or returns NaN/inf.
    """
    import torch

    values = validated_scores(fn, prompts, responses)
    scores = torch.tensor(values, dtype=torch.float32)
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise RewardError(
            f"The reward function {describe(fn)} returned {values[index]!r} at index {index}, which overflows "
            f"float32 ({_sample(prompts, responses, index)}). Scale the scores down."
        )
    return scores


def validated_scores(fn: RewardFunction, prompts: Sequence[str], responses: Sequence[str], name: Optional[str] = None) -> list[float]:
    """``fn(prompts, responses)`` as B finite Python floats; ``name`` (default ``describe(fn)``) is used in messages."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    name = describe(fn) if name is None else name
    try:
        raw = fn(prompts, responses)
    except RewardError:
        raise  # already diagnosed (a weighted sum's component, a source's own check)
    except Exception as err:
        _raise_located(fn, name, prompts, responses, err)
    values = _as_floats(raw, len(prompts), name, prompts, responses)
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise RewardError(
                f"The reward function {name} returned {value} at index {index} "
                f"({_sample(prompts, responses, index)}). Rewards must be finite numbers; guard the computation "
                f"(e.g. division by zero, log of 0) for such inputs."
            )
    return values


def _raise_located(fn: RewardFunction, name: str, prompts: Sequence[str], responses: Sequence[str], batch_error: Exception) -> None:
    """Re-run ``fn`` one sample at a time to name the first sample that fails on its own."""
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            fn([prompt], [response])
        except Exception as sample_error:
            raise RewardError(
                f"The reward function {name} raised {_exception_text(sample_error)} on sample {index} "
                f"({_sample(prompts, responses, index)}). Fix the function for such inputs."
            ) from sample_error
    raise RewardError(
        f"The reward function {name} raised {_exception_text(batch_error)} on the batch of {len(prompts)} samples, "
        f"though no single sample fails alone. Check how it handles a whole batch (e.g. lengths, padding)."
    ) from batch_error


def _as_floats(raw: Any, expected: int, name: str, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The returned sequence as Python floats, or a RewardError saying what is wrong with it."""
    import torch

    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu()
        raw = (raw.float() if raw.dtype == torch.bfloat16 else raw).numpy()  # NumPy has no bfloat16
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1:
            raise RewardError(
                f"The reward function {name} returned an array of shape {tuple(raw.shape)}; it must return one "
                f"number per sample, i.e. a sequence of length {expected}."
            )
        raw = list(raw)
    if not isinstance(raw, (list, tuple)):
        raise RewardError(
            f"The reward function {name} returned {type(raw).__name__} ({_short(repr(raw))}); it must return a list "
            f"(or tuple, NumPy array, 1-D tensor) of {expected} numbers, one per sample."
        )
    if len(raw) != expected:
        raise RewardError(
            f"The reward function {name} returned {len(raw)} scores for {expected} samples; it must return exactly "
            f"one number per (prompt, response) pair, in order."
        )
    values = []
    for index, item in enumerate(raw):
        value = _as_number(item)
        if value is None:
            raise RewardError(
                f"The reward function {name} returned {_short(repr(item))} (a {type(item).__name__}) at index {index}, "
                f"which is not a number ({_sample(prompts, responses, index)}). Return an int or float per sample."
            )
        values.append(value)
    return values


def _as_number(item: Any) -> Optional[float]:
    """``item`` as a float if it is a real number (bools excluded; 0-d tensors/arrays allowed), else None."""
    import torch

    if isinstance(item, torch.Tensor):
        if item.dim() != 0 or item.dtype == torch.bool or item.is_complex():
            return None
        return float(item.item())
    if isinstance(item, np.ndarray):
        if item.ndim != 0:
            return None
        item = item[()]
    if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real):
        return None
    return float(item)


def _exception_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {_short(str(error), 300)}" if str(error) else type(error).__name__


def _sample(prompts: Sequence[str], responses: Sequence[str], index: int) -> str:
    return f"prompt={_short(repr(prompts[index]))}, response={_short(repr(responses[index]))}"


def _short(text: str, limit: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
