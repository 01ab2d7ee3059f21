"""Seed helpers under legacy TRL's names: ``from trl.core import X`` becomes ``from rlhf_cli.core import X``.

The tensor math lives in :mod:`rlhf_cli.algo.functional` and is re-exported here; ``rlhf_cli.core``
is this module under its public name.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from rlhf_cli.algo import functional
from rlhf_cli.algo.functional import (
    clip_by_value,
    entropy_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    whiten,
)
from rlhf_cli.seeding import set_seed

__all__ = [
    "LengthSampler",
    "clip_by_value",
    "entropy_from_logits",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "respond_to_batch",
    "set_seed",
    "whiten",
]


def logprobs_from_logits(logits: Tensor, labels: Tensor | None, gather: bool = True) -> Tensor:
    """TRL's signature: log-probabilities of ``labels`` [...] under ``logits`` [..., V] (float32 for half
    inputs), or with ``gather=False`` the whole log-softmax [..., V] (what TRL's ``full`` KL takes)."""
    if not gather:
        return torch.log_softmax(logits, dim=-1)
    return functional.logprobs_from_logits(logits, labels)


class LengthSampler:
    """Draws an integer uniformly from ``[min_value, max_value)`` (upper bound excluded, as in TRL).

    Uses numpy's global generator, so :func:`set_seed` makes the draws reproducible.
    """

    def __init__(self, min_value: int, max_value: int) -> None:
        if max_value <= min_value:
            raise ValueError(
                f"LengthSampler needs min_value < max_value (the upper bound is excluded), got {min_value} and {max_value}."
            )
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


@torch.no_grad()
def respond_to_batch(model: nn.Module, queries: Tensor, txt_len: int = 20, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sample exactly ``txt_len`` tokens after each query: [B, Lq] -> [B, txt_len].

    Like legacy TRL, sampling does not stop at EOS (every row gets ``txt_len`` tokens); unlike its
    token-by-token loop without a cache, this runs one batched ``generate`` with the KV cache.
    ``top_k=0`` and ``top_p=1.0`` mean no filtering. Queries must not contain padding.
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be a 2-D tensor [batch, length] of token ids, got shape {tuple(queries.shape)}.")
    if txt_len < 1:
        raise ValueError(f"txt_len must be at least 1, got {txt_len}.")
    lm = getattr(model, "pretrained_model", model)
    generation_config = copy.deepcopy(lm.generation_config)
    # No EOS: TRL's loop samples txt_len tokens whatever they are; stopping early would change that.
    generation_config.eos_token_id = None
    generation_config.pad_token_id = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
    generation_config.update(max_new_tokens=txt_len, do_sample=True, top_k=top_k, top_p=top_p)
    device = next(lm.parameters()).device
    # transformers fills a given config's unset fields (eos_token_id among them) from the model's own
    # generation config, so the model carries the EOS-free copy for the duration of the call.
    own_config = lm.generation_config
    lm.generation_config = generation_config
    try:
        output = lm.generate(
            input_ids=queries.to(device),
            attention_mask=torch.ones_like(queries, device=device),
            generation_config=generation_config,
        )
    finally:
        lm.generation_config = own_config
    return output[:, -txt_len:]
