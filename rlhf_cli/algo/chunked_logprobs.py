"""The LM head, log-softmax and the selected tokens' log-probabilities, a chunk of tokens at a time.

The straightforward way to get log π(y_t) is ``logits = hidden @ W.T`` [N, V], a float32 copy for the
logsumexp, and autograd keeping the logits (and what the entropy statistic made of them) until the
backward pass: with a 49k vocabulary that is 200 KB of float32 per token, the largest tensors of a
PPO step on a small model. Here the head is applied to ``chunk`` tokens at a time; each chunk's
logits live in float32 only while its logsumexp, gathered label logit and entropy are taken, and
the backward pass recomputes them per chunk from the saved hidden states (the technique of Liger's
fused linear cross-entropy and of verl's and NeMo-RL's chunked log-probabilities). Autograd keeps
hidden [N, H] and one float32 [N] logsumexp, never a [N, V] tensor.

Numbers: the logits are formed in the weight's dtype (bf16 weights give bf16 logits, rounded as the
straightforward path rounds them), every reduction is float32, the results are float32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

# float32 logits per chunk: 2^24 elements (64 MiB), e.g. 341 tokens of a 49,152-word vocabulary.
CHUNK_ELEMENTS = 1 << 24


class HeadLogProbs(NamedTuple):
    """logprobs [N] (differentiable), entropy [N] (a statistic: no gradient); float32, or float64 for float64 inputs."""

    logprobs: Tensor
    entropy: Tensor


def tokens_per_chunk(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """How many tokens' float32 logits fit in ``chunk_elements``: at least one."""
    return max(1, chunk_elements // vocab_size)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """float32 for half-precision weights, the weights' dtype otherwise (float64 stays float64)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The head over one chunk: [n, H] -> [n, V] in at least float32 (formed in the weight's dtype, then upcast)."""
    return F.linear(hidden, weight, bias).to(_compute_dtype(weight))


def _chunk_forward(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logprob of the label, logsumexp, entropy) of float32 logits [n, V] with labels [n]: three [n].

    Computed from the logits shifted by their maximum: the entropy lse − Σ p·l is then a difference of
    small numbers, not of two large ones that cancel (logits of 1e4 would give a negative entropy).
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    shifted_lse = torch.logsumexp(shifted, dim=-1)
    label_logprobs = shifted.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - shifted_lse
    probs = torch.exp(shifted - shifted_lse.unsqueeze(-1))
    # An impossible token (l = −inf, p = 0) contributes 0, not 0·(−inf) = NaN.
    expected = (probs * torch.where(probs > 0, shifted, torch.zeros_like(shifted))).sum(dim=-1)
    return label_logprobs, shifted_lse + (logits - shifted)[:, 0], shifted_lse - expected


def _chunk_logit_grad(logits: Tensor, lse: Tensor, labels: Tensor, grad: Tensor) -> Tensor:
    """d(Σ grad·logprob)/d logits for one chunk: grad·(onehot(label) − softmax), [n, V] float32."""
    dlogits = torch.exp(logits - lse.unsqueeze(-1)).mul_(-grad.unsqueeze(-1))
    return dlogits.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1))


class ChunkedHeadLogProbs(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, labels [N], chunk) -> (logprobs [N], entropy [N])``.

    Forward and backward both loop over ``chunk`` tokens; only ``logprobs`` has a gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, chunk: int):  # type: ignore[override]
        n_tokens = hidden.shape[0]
        logprobs = hidden.new_empty(n_tokens, dtype=_compute_dtype(weight))
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs)
        for start in range(0, n_tokens, chunk):
            part = slice(start, start + chunk)
            logprobs[part], lse[part], entropy[part] = _chunk_forward(_chunk_logits(hidden[part], weight, bias), labels[part])
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor):  # type: ignore[override]
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Weight gradients add up over chunks in float32 and are rounded to the weight's dtype once.
        dtype = _compute_dtype(weight)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        grad_logprobs = grad_logprobs.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = _chunk_logits(hidden[part], weight, bias)
            dlogits = _chunk_logit_grad(logits, lse[part], labels[part], grad_logprobs[part])
            del logits
            if grad_bias is not None:
                grad_bias += dlogits.sum(dim=0)
            dlogits = dlogits.to(weight.dtype)  # as the straightforward path rounds the logits' gradient
            if grad_hidden is not None:
                grad_hidden[part] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ hidden[part]).to(dtype)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def chunked_head_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, chunk: Optional[int] = None
) -> HeadLogProbs:
    """log softmax(hidden @ weight.T + bias)[label] and the entropy of that softmax, per token.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> HeadLogProbs([N], [N]), float32.
    ``chunk`` tokens at a time (default: :func:`tokens_per_chunk` of V), in forward and backward.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_head_logprobs wants hidden [N, H] and labels [N]; got {tuple(hidden.shape)}, {tuple(labels.shape)}.")
    chunk = chunk or tokens_per_chunk(weight.shape[0])
    logprobs, entropy = ChunkedHeadLogProbs.apply(hidden, weight, bias, labels.long(), chunk)
    return HeadLogProbs(logprobs=logprobs, entropy=entropy)
