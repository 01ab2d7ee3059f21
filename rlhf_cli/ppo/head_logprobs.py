"""Response log-probabilities through the chunked LM head (:mod:`rlhf_cli.algo.chunked_logprobs`).

The model runs without its LM head (``lm_head=False`` of the causal value-head wrapper) and returns
the last hidden state at the positions that predict response tokens, flattened to [N, H]; the head,
log-softmax and gather then run a chunk of tokens at a time, so no [B, T, V] logits exist. Used
where the model allows it (:func:`chunkable_lm_head`); elsewhere the caller computes the logits.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from rlhf_cli.algo.chunked_logprobs import chunked_head_logprobs
from rlhf_cli.rollout.packing import PackedBatch, real_token_index
from rlhf_cli.rollout.unwrap import is_sharded

# Architectures whose logits are exactly ``lm_head(last hidden state)`` (no soft-capping, logit
# scale or other transform after the head): others keep the straightforward path.
PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox"})


class HeadOutputs(NamedTuple):
    """Response-aligned [B, T] float32 log-probabilities, entropies (None when not asked for) and values
    (None without the value head); 0 at padding."""

    logprobs: Tensor
    entropy: Optional[Tensor]
    values: Optional[Tensor]


def chunkable_lm_head(model: nn.Module) -> Optional[nn.Linear]:
    """The plain ``nn.Linear`` LM head of a causal value-head ``model``, or None where the chunked path
    does not apply: a seq2seq model, a head that is not a plain Linear (LoRA on the head), an
    architecture that transforms its logits, a model wrapped by anything but DDP (FSDP, DeepSpeed:
    sharded weights), a model sharded in place by FSDP2 (its head's weight is a DTensor shard, gathered
    only inside the model's forward) or whose forward Accelerate wrapped in autocast (the head would
    escape it)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if is_sharded(model):
        return None
    language_model = getattr(model, "pretrained_model", None)
    if language_model is None or getattr(model, "is_encoder_decoder", True) or hasattr(model, "_original_forward"):
        return None
    config = getattr(language_model, "config", None)
    head = language_model.get_output_embeddings()
    if type(head) is not nn.Linear or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    return head


def _real_tokens(batch: PackedBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(keep, rows, cols): what the model keeps, and the (row, column) of each kept token, row-major.

    Equal lengths keep the T predicting positions by index (no boolean selection, so no device sync);
    otherwise a boolean [B, L] mask of the positions predicting real tokens.
    """
    width_t, device = batch.response_width, batch.input_ids.device
    width_q = batch.input_ids.shape[1] - width_t
    rows, cols = real_token_index(batch.response_lengths, device)
    if sum(batch.response_lengths) == batch.batch_size * width_t:
        return torch.arange(width_q - 1, width_q - 1 + width_t, device=device), rows, cols
    keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=device)
    keep[rows, cols + (width_q - 1)] = True  # input position Lq - 1 + t predicts response token t
    return keep, rows, cols


def chunked_response_outputs(model: nn.Module, head: nn.Linear, batch: PackedBatch, *, values: bool, entropy: bool) -> HeadOutputs:
    """One forward pass of the decoder-only ``model`` without its LM head, then the chunked head at the
    real response tokens: [B, T] log-probabilities (with graph), entropies (without; when ``entropy``) and values."""
    keep, rows, cols = _real_tokens(batch)
    hidden, _, value_out = model(**batch.model_inputs(), logits_to_keep=keep, with_values=values, lm_head=False)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B, T, H] or already [N, H], row-major either way
    if value_out is not None:
        value_out = value_out.reshape(-1)
    out = chunked_head_logprobs(hidden, head.weight, head.bias, batch.response_ids[rows, cols], entropy=entropy)
    shape = (batch.batch_size, batch.response_width)

    def scatter(flat: Tensor) -> Tensor:
        return flat.new_zeros(shape).index_put((rows, cols), flat)

    return HeadOutputs(
        scatter(out.logprobs),
        None if out.entropy is None else scatter(out.entropy),
        None if value_out is None else scatter(value_out.float()),
    )
