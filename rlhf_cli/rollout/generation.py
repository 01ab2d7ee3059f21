"""Batched response generation with per-sample lengths, cut at the first EOS.

Queries of any lengths are padded into chunks of ``batch_size`` and generated together with the
KV cache (``model.generate``). Each sample may have its own length budget: the chunk generates up
to the longest budget and each response is truncated to its own. Truncating a longer sample gives
the same distribution over its first n tokens as generating n tokens, and one batched call beats
one call per length by far.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from rlhf_cli.rollout.packing import _stack_padded


def cut_at_eos(tokens: Tensor, eos_token_id: Optional[int | Sequence[int]]) -> Tensor:
    """Keep tokens up to and including the first EOS (1-D in, 1-D out)."""
    if eos_token_id is None or tokens.numel() == 0:
        return tokens
    eos_ids = torch.as_tensor(eos_token_id, device=tokens.device).reshape(-1)
    hits = torch.isin(tokens, eos_ids).nonzero()
    return tokens if hits.numel() == 0 else tokens[: int(hits[0, 0]) + 1]


def _budgets(max_new_tokens: int | Sequence[int], count: int) -> list[int]:
    """One ``max_new_tokens`` per query, each at least 1."""
    budgets = [int(max_new_tokens)] * count if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(budgets) != count:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {count} queries.")
    if any(n < 1 for n in budgets):
        raise ValueError(f"Every max_new_tokens must be at least 1, got {min(budgets)}.")
    return budgets


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    queries: Sequence[Tensor],
    *,
    max_new_tokens: int | Sequence[int],
    pad_token_id: int,
    eos_token_id: Optional[int | Sequence[int]],
    is_encoder_decoder: bool,
    batch_size: Optional[int] = None,
    device: torch.device | str = "cpu",
    stop_at_eos: bool = True,
    pad_to_multiple_of: Optional[int] = None,
    generate_eos_token_id: Optional[int | Sequence[int]] = None,
    **generation_kwargs: Any,
) -> list[Tensor]:
    """Generate one response (new tokens only, 1-D, on CPU) per query.

    ``model`` must have a transformers ``generate`` (unwrap DDP/FSDP wrappers before calling).
    ``max_new_tokens`` is one budget for all or one per query. Responses keep their EOS token
    and nothing after it when ``stop_at_eos``. ``pad_to_multiple_of`` widens each chunk's query
    padding to a multiple of it (shape-bucketing for compiled kernels). ``generate_eos_token_id``, when
    given, is the ``eos_token_id`` ``model.generate`` stops at, in place of the model's own (TRL scripts
    pass -1 to never stop early); responses are still cut at ``eos_token_id``.
    """
    budgets = _budgets(max_new_tokens, len(queries))
    chunk = batch_size or len(queries)
    responses: list[Tensor] = []
    for start in range(0, len(queries), chunk):
        part = list(queries[start : start + chunk])
        part_budgets = budgets[start : start + chunk]
        width = max(int(q.shape[0]) for q in part)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        # Decoder-only models continue the query, so its padding goes on the left.
        input_ids, attention_mask = _stack_padded(part, width, pad_token_id, left=not is_encoder_decoder)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max(part_budgets),
            pad_token_id=pad_token_id,
            **({} if generate_eos_token_id is None else {"eos_token_id": generate_eos_token_id}),
            **generation_kwargs,
        )
        # Decoder output repeats the padded query; encoder-decoder output starts with the decoder start token.
        new_tokens = output[:, 1:] if is_encoder_decoder else output[:, width:]
        new_tokens = new_tokens.cpu()
        for row, budget in zip(new_tokens, part_budgets):
            row = row[:budget]
            responses.append(cut_at_eos(row, eos_token_id) if stop_at_eos else row)
    return responses
