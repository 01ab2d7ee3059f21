"""Running a (value-head) model over a packed batch and reading the response-aligned outputs.

The model is any module that takes the packed inputs and returns ``(logits, loss, values)``
like the value-head wrappers. Outputs are sliced to response-aligned [B, T] (logits [B, T, V]).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, NamedTuple

import torch
from torch import Tensor, nn

from rlhf_cli.algo.functional import entropy_from_logits, logprobs_from_logits
from rlhf_cli.algo.kl import full_kl
from rlhf_cli.ppo.head_logprobs import chunkable_lm_head, chunked_response_outputs
from rlhf_cli.rollout.packing import PackedBatch, cat_to_width, real_token_index


class ResponseOutputs(NamedTuple):
    """Model outputs at the positions that predict each response token.

    logits [B, T, V] (None when not kept: ``response_outputs(logits=False)``), logprobs [B, T] of the
    response tokens, values [B, T] (None when the value head was not run), entropy [B, T] of the
    policy at each position (only from the chunked head; else None: compute it from the logits).
    """

    logits: Tensor | None
    logprobs: Tensor
    values: Tensor | None
    entropy: Tensor | None = None


def response_outputs(
    model: nn.Module, batch: PackedBatch, *, values: bool = True, logits: bool = True, entropy: bool = True
) -> ResponseOutputs:
    """One forward pass of ``model`` over ``batch``, sliced to the response positions.

    ``logits=False``: the caller needs no logits; where the model allows it (:func:`chunkable_lm_head`)
    the LM head and log-softmax then run in chunks of tokens and no [B, T, V] tensor is made
    (``ResponseOutputs.logits`` None, ``entropy`` set unless ``entropy=False``: the no-gradient passes,
    which read no entropy, skip its two passes over every chunk's logits); elsewhere the logits are
    computed as usual.

    ``values=False`` skips the value head (a critic-free estimator; the reference, whose values
    nobody reads): ``ResponseOutputs.values`` is then None.

    Decoder-only models compute the LM head only where a response token is predicted: when all
    responses have the same length, over the T positions that predict one (a contiguous input, see
    below); when
    some are shorter (EOS, sampled lengths), only at their real tokens, see
    :func:`_packed_response_outputs`. Padding positions then hold zero logits and values.
    """
    # On the model's device: every index below is built on the inputs' device, and a batch packed on
    # the host (the library's callers, the tests) would otherwise reach a GPU model's embedding on
    # the CPU ("index is on cpu", seen on an H200).
    batch = batch.to(_device_of(model, batch.input_ids.device))
    head = None if logits or batch.is_encoder_decoder else chunkable_lm_head(model)
    if head is not None:
        chunked = chunked_response_outputs(model, head, batch, values=values, entropy=entropy)
        return ResponseOutputs(logits=None, logprobs=chunked.logprobs, values=chunked.values, entropy=chunked.entropy)
    width_t = batch.response_width
    with_values = {"with_values": False} if not values else {}  # the wrappers' default: values on
    if batch.is_encoder_decoder:
        logits, _, value_out = model(**batch.model_inputs(), **with_values)
    elif sum(batch.response_lengths) < batch.batch_size * width_t:
        return _packed_response_outputs(model, batch, with_values)
    else:
        # Only input positions Lq - 1 ... Lq + T - 2 predict response tokens: skipping the LM head
        # over the query saves a [B, Lq, V] matmul. The positions go in as an index tensor, not as
        # the int k of "the last k": transformers would then hand the head the strided view
        # hidden[:, -k:], and F.linear of a non-contiguous 3-D input with a weight that does not
        # require grad (a frozen reference) takes matmul's expand + bmm path, which copies the
        # [V, H] weight once per row (87x slower in bf16 on SmolLM2). Indexing makes a
        # contiguous [B, T, H] copy, which the head folds into one [B*T, H] x [H, V] matmul.
        width_q = batch.input_ids.shape[1] - width_t
        predicting = torch.arange(width_q - 1, width_q - 1 + width_t, device=batch.input_ids.device)
        logits, _, value_out = model(**batch.model_inputs(), logits_to_keep=predicting, **with_values)
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    return ResponseOutputs(logits=logits, logprobs=logprobs, values=_float_or_none(value_out))


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    """Where ``model``'s weights live (a sharded model's local shards included), or ``default``."""
    first = next(model.parameters(), None)
    return default if first is None else first.device


def response_entropy(out: ResponseOutputs) -> Tensor:
    """The policy's entropy at each response position, [B, T] float32: the chunked head's, or from the logits."""
    return out.entropy if out.entropy is not None else entropy_from_logits(out.logits.detach())


def _float_or_none(values: Tensor | None) -> Tensor | None:
    return None if values is None else values.float()


def _packed_response_outputs(model: nn.Module, batch: PackedBatch, with_values: dict[str, bool]) -> ResponseOutputs:
    """:func:`response_outputs` for responses of different lengths: LM head and value head at real tokens only.

    Positions predicting response padding would cost the [*, H] x [H, V] LM-head matmul (and its
    gradient) for nothing; with lengths drawn from 4-16 tokens that is about a third of them. The
    model gets a boolean ``logits_to_keep`` [B, L] (transformers flattens the kept positions to
    [N, V]); logits and values are scattered back into zero-filled [B, T(, V)] tensors, and the
    log-probabilities are read from that scattered tensor so autograd keeps one [B, T, V] copy
    of the logits, as the equal-length path does. (On a GPU the boolean selection of hidden states,
    in transformers and again in the value head, costs a device sync each for its data-dependent
    size: two per forward pass, small next to the LM-head work saved.)
    """
    width_q = batch.input_ids.shape[1] - batch.response_width
    device = batch.input_ids.device
    rows, cols = real_token_index(batch.response_lengths, device)
    keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=device)
    keep[rows, cols + (width_q - 1)] = True  # input position Lq - 1 + t predicts response token t
    packed_logits, _, packed_values = model(**batch.model_inputs(), logits_to_keep=keep, **with_values)
    shape = (batch.batch_size, batch.response_width)
    logits = packed_logits.new_zeros(*shape, packed_logits.shape[-1]).index_put((rows, cols), packed_logits)
    values = None if packed_values is None else packed_values.new_zeros(shape).index_put((rows, cols), packed_values)
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    return ResponseOutputs(logits=logits, logprobs=logprobs, values=_float_or_none(values))


def _as_context(reference: nn.Module | Callable[[], ContextManager[nn.Module]]) -> ContextManager[nn.Module]:
    return contextlib.nullcontext(reference) if isinstance(reference, nn.Module) else reference()


class RolloutScores(NamedTuple):
    """No-gradient quantities of a whole batch, response-aligned [B, T] (values None without a critic)."""

    logprobs: Tensor
    values: Tensor | None
    ref_logprobs: Tensor
    full_kl: Tensor | None


@torch.no_grad()
def score_rollout(
    policy: nn.Module,
    reference: nn.Module | Callable[[], ContextManager[nn.Module]],
    batch: PackedBatch,
    *,
    chunk_size: int,
    need_full_kl: bool,
    need_values: bool = True,
) -> RolloutScores:
    """Old logprobs and values from the policy and logprobs from the reference, in chunks.

    ``reference`` is a module, or a function returning a context that yields one (a PEFT policy
    with its adapter disabled: the policy pass must run outside that context).
    One forward pass each per chunk; the value head runs on the policy only, and only when
    ``need_values`` (a critic-free estimator has none to read). The full-vocabulary KL (``kl_penalty="full"``) needs both
    models' logits at once; computing it per chunk keeps only [chunk, T, V] alive at a time.
    """
    # Both models the same way (chunked head or logits), so that their log-probabilities differ by
    # the models alone: a reference equal to the policy must give a KL of exactly 0.
    logits = need_full_kl or chunkable_lm_head(policy) is None
    parts: list[RolloutScores] = []
    for start in range(0, batch.batch_size, chunk_size):
        rows = list(range(start, min(start + chunk_size, batch.batch_size)))
        chunk = batch if len(rows) == batch.batch_size else batch.select(rows)
        pol = response_outputs(policy, chunk, values=need_values, logits=logits, entropy=False)
        with _as_context(reference) as ref_model:
            ref = response_outputs(ref_model, chunk, values=False, logits=logits, entropy=False)
        kl = full_kl(pol.logits, ref.logits) if need_full_kl else None
        parts.append(RolloutScores(pol.logprobs, pol.values, ref.logprobs, kl))
    width = batch.response_width

    def cat(tensors: list[Tensor]) -> Tensor:
        return cat_to_width(tensors, width)

    return RolloutScores(
        logprobs=cat([p.logprobs for p in parts]),
        values=cat([p.values for p in parts]) if need_values else None,
        ref_logprobs=cat([p.ref_logprobs for p in parts]),
        full_kl=cat([p.full_kl for p in parts]) if need_full_kl else None,
    )
