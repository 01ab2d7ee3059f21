"""Checking what users hand to ``PPOEngine.step`` (and TRL's ``PPOTrainer.step``) before any tensor math sees it.

Each check names the argument and the offending index, so a mistake reads as a sentence and not
as a shape error deep inside a matmul.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def _check_token_list(name: str, items: Any, expected: int) -> list[Tensor]:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list of 1-D token tensors, got {type(items).__name__}.")
    if len(items) != expected:
        raise ValueError(f"{name} has {len(items)} entries but the batch has {expected} (config.batch_size).")
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor of token ids, got {type(item).__name__}.")
        if item.dim() != 1:
            raise ValueError(f"{name}[{i}] must be 1-D (one sequence of token ids), got shape {tuple(item.shape)}.")
        if item.dtype.is_floating_point or item.dtype == torch.bool:
            raise TypeError(f"{name}[{i}] must hold integer token ids, got dtype {item.dtype}.")
        if item.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty: every query and response needs at least one token.")
        checked.append(item)
    return checked


def _score_value(i: int, score: Any) -> float:
    if isinstance(score, Tensor):
        # A one-element 1-D tensor is a score too (TRL squeezes it); 2-D is refused, as TRL refuses it.
        if score.numel() != 1 or score.dim() > 1:
            raise ValueError(
                f"scores[{i}] must be a scalar (one number per sample: a 0-d or one-element 1-d tensor), got a tensor of shape {tuple(score.shape)}."
            )
        value = float(score.detach().float().cpu().reshape(()))
    elif isinstance(score, Real) and not isinstance(score, bool):
        value = float(score)
    else:
        raise TypeError(f"scores[{i}] must be a number or a 0-d tensor, got {type(score).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"scores[{i}] is {value}: scores must be finite numbers.")
    return value


def check_scores(scores: Any, expected: int) -> Tensor:
    """Scores as a float32 [B] tensor; accepts a list of numbers/0-d tensors or a 1-D tensor."""
    if isinstance(scores, Tensor):
        if scores.dim() > 1 or (scores.dim() == 1 and scores.shape[0] != expected):
            raise ValueError(f"scores must hold one number per sample ({expected}), got a tensor of shape {tuple(scores.shape)}.")
        return _checked_tensor(scores, expected)
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"scores must be a list of numbers or 0-d tensors, got {type(scores).__name__}.")
    if len(scores) != expected:
        raise ValueError(f"scores has {len(scores)} entries but the batch has {expected} (config.batch_size).")
    return torch.tensor([_score_value(i, s) for i, s in enumerate(scores)], dtype=torch.float32)


def _checked_tensor(scores: Tensor, expected: int) -> Tensor:
    """A score tensor as float32 [B] on the CPU in one transfer (not one host sync per sample)."""
    values = scores.detach().reshape(-1).float().cpu().clone()  # never a view of the caller's tensor
    if values.numel() != expected:
        raise ValueError(f"scores has {values.numel()} entries but the batch has {expected} (config.batch_size).")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise ValueError(f"scores[{index}] is {float(values[index])}: scores must be finite numbers.")
    return values


def check_step_inputs(
    queries: Any,
    responses: Any,
    scores: Any,
    response_masks: Optional[Sequence[Tensor]],
    batch_size: int,
) -> tuple[list[Tensor], list[Tensor], Tensor, Optional[list[Tensor]]]:
    """Validate ``step`` arguments against the configured per-process batch size."""
    if isinstance(queries, (list, tuple)) and isinstance(responses, (list, tuple)) and len(queries) != len(responses):
        raise ValueError(f"queries has {len(queries)} entries but responses has {len(responses)}: pass one response per query.")
    queries = _check_token_list("queries", queries, batch_size)
    responses = _check_token_list("responses", responses, batch_size)
    score_tensor = check_scores(scores, batch_size)
    masks = None
    if response_masks is not None:
        if not isinstance(response_masks, (list, tuple)) or len(response_masks) != batch_size:
            raise ValueError(f"response_masks must be a list of {batch_size} 1-D tensors (one per response).")
        masks = []
        for i, (mask, response) in enumerate(zip(response_masks, responses)):
            if not isinstance(mask, Tensor) or mask.shape != response.shape:
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"response_masks[{i}] must be a tensor shaped like responses[{i}] {tuple(response.shape)}, got {shape}.")
            if not bool(mask.bool().any()):
                raise ValueError(f"response_masks[{i}] masks out every token of responses[{i}]; at least one must count.")
            masks.append(mask)
    return queries, responses, score_tensor, masks


def check_prompt_groups(queries: Sequence[Tensor], group_size: int) -> None:
    """With ``samples_per_prompt`` = G > 1, the samples must come prompt-major: queries g·G … g·G + G − 1
    are one prompt, repeated. ValueError naming the first group that is not (the batch size itself is
    a multiple of G, checked with the settings)."""
    if group_size == 1:
        return
    for start in range(0, len(queries), group_size):
        first = queries[start]
        for offset in range(1, group_size):
            other = queries[start + offset]
            if other.shape != first.shape or not torch.equal(other, first):
                raise ValueError(
                    f"samples_per_prompt={group_size}: samples {start}-{start + group_size - 1} should be the "
                    f"{group_size} responses to one prompt, but queries[{start + offset}] differs from "
                    f"queries[{start}]. Pass the samples prompt-major: the {group_size} responses of each prompt "
                    "next to each other, each with the same query tensor."
                )

def token_ids(tokenizer: Any, model_config: Any) -> tuple[int, int | None]:
    """(pad id, EOS id) for generation. Padding: the tokenizer's pad, else its EOS, else the model
    config's pad or EOS, else 0 (any id is safe: padded positions are masked out). EOS: the
    tokenizer's, else the model config's. One rule for the trainer (``PPOEngine.pad_token_id``) and the held-out
    evaluation (``engine.heldout``)."""
    pad = next(
        (
            value
            for source in (tokenizer, model_config)
            if source is not None
            for value in (getattr(source, "pad_token_id", None), getattr(source, "eos_token_id", None))
            if isinstance(value, int)
        ),
        0,
    )
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return pad, eos if eos is not None else getattr(model_config, "eos_token_id", None)


def as_score_tensor(scores: Any, device: torch.device) -> Tensor:
    """Scores given as a tensor or a list of numbers / 0-d tensors -> [B] on ``device``."""
    if isinstance(scores, Tensor):
        return scores.to(device).reshape(-1)
    return torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores]).to(device)
