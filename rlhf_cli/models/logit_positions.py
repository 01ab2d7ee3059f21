"""Computing a language model's logits only at the positions asked for, on every transformers version.

Transformers' ``logits_to_keep`` lets the LM head skip positions whose logits nobody reads (the
query, response padding). What a model's ``forward`` accepts depends on the release and the
architecture: some (GPT-J and GPT-2 under transformers 4.46) take no ``logits_to_keep``; 4.57 and a
few 5.x architectures take an int or 1-D positions but not the 2-D forms (per-row positions, a
boolean mask). :func:`logits_at` feature-detects what the model takes — its ``forward`` signature,
and whether its modeling module uses transformers' own slicing helper, which reads every form —
and otherwise asks for the narrowest window whose hidden states the head gets contiguous (one
row: from the first kept position; several: every position) and selects the positions itself. The logits
are the same either way; only the work differs.
"""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from rlhf_cli.models.model_facts import keep_positions

# The helper transformers' modeling modules call to slice by logits_to_keep in all its forms; a module
# that imports it reads 2-D positions and boolean masks too.
_SLICING_HELPER = "slice_logits_to_keep"


def _innermost_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (whose own forward forwards keywords)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@lru_cache(maxsize=None)
def _forward_support(model_class: type) -> tuple[bool, bool]:
    """(takes an int ``logits_to_keep``, takes its 2-D forms too) for a model class."""
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False, False
    takes = "logits_to_keep" in parameters
    module = sys.modules.get(model_class.__module__)
    return takes, takes and hasattr(module, _SLICING_HELPER)


def logits_at(model: nn.Module, logits_to_keep: int | Tensor, **inputs: Any) -> Any:
    """``model(**inputs)`` with ``outputs.logits`` holding only the positions ``logits_to_keep`` selects
    (see :func:`keep_positions`), computed by the LM head at as few positions as the model allows."""
    takes_int, takes_tensors = _forward_support(type(_innermost_model(model)))
    if isinstance(logits_to_keep, Tensor) and isinstance(inputs.get("input_ids"), Tensor):
        logits_to_keep = logits_to_keep.to(inputs["input_ids"].device)  # transformers gathers with it as it is
    if isinstance(logits_to_keep, int) and takes_int or isinstance(logits_to_keep, Tensor) and takes_tensors:
        return model(**inputs, logits_to_keep=logits_to_keep)
    if isinstance(logits_to_keep, int) or not takes_int:
        return _every_position(model, logits_to_keep, inputs)
    # Tensor positions for a model that takes only an int: the window from the first kept position.
    length = inputs["input_ids"].shape[1]
    columns = logits_to_keep.nonzero()[:, -1] if logits_to_keep.dtype == torch.bool else logits_to_keep
    first = int(columns.min()) if columns.numel() else length
    if inputs["input_ids"].shape[0] > 1 and 0 < first < length:
        # The model would hand its head hidden[:, -k:], a strided view for several rows: F.linear then
        # takes matmul's expand + bmm path, which copies the [V, H] weight per row (87x the cost in bf16
        # on SmolLM2; seen with transformers 5.17's GPT-2 and Llama). The head over the query costs less.
        return _every_position(model, logits_to_keep, inputs)
    outputs = model(**inputs, logits_to_keep=max(length - first, 1))
    window = outputs.logits[:, -(length - first):] if first < length else outputs.logits[:, :0]
    shifted = logits_to_keep[:, first:] if logits_to_keep.dtype == torch.bool else logits_to_keep - first
    outputs.logits = keep_positions(window, shifted)
    return outputs


def _every_position(model: nn.Module, logits_to_keep: int | Tensor, inputs: dict[str, Any]) -> Any:
    """The model's logits at every position, then the positions ``logits_to_keep`` selects."""
    outputs = model(**inputs)
    outputs.logits = keep_positions(outputs.logits, logits_to_keep)
    return outputs
