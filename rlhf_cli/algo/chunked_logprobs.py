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
    """logprobs [N] (differentiable), entropy [N] (a statistic: no gradient; None when not asked for);
    float32, or float64 for float64 inputs."""

    logprobs: Tensor
    entropy: Optional[Tensor]


def tokens_per_chunk(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """How many tokens' float32 logits fit in ``chunk_elements``: at least one."""
    return max(1, chunk_elements // vocab_size)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """float32 for half-precision weights, the weights' dtype otherwise (float64 stays float64)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _chunk_logits(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The head over one chunk, [n, H] -> [n, V], written into ``out`` (the call's reused float32 buffer):
    formed in the weight's dtype, then upcast. Writing into one buffer matters on the CPU: a fresh
    64 MiB tensor per chunk is fresh pages from the OS each time, and faulting them in cost as much as
    every softmax pass together (measured: ``torch.exp`` into a new tensor 0.045 s, in place 0.02 s)."""
    if weight.dtype != out.dtype:
        return out.copy_(F.linear(hidden, weight, bias))
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _chunk_forward(logits: Tensor, labels: Tensor, exps: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(logprob of the label, logsumexp, entropy) of float32 logits [n, V] with labels [n]: three [n] (entropy None without ``exps``).

    Overwrites ``logits``. ``exps`` is a scratch [n, V] for the entropy, or None to skip the entropy
    (None returned). Everything is taken from the logits shifted by their maximum s = l − max: the label's
    log-probability s_y − log Σ e^s is then ≤ 0 exactly (s_y ≤ 0 and the sum holds e^0 = 1), and the
    entropy log Σ e^s − Σ p·s is a difference of small numbers, not of two large ones that cancel.
    """
    maxes = logits.amax(dim=-1, keepdim=True)
    shifted = logits.sub_(maxes)
    label_shifted = shifted.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if exps is None:
        log_sums = shifted.exp_().sum(dim=-1).log_()
        return label_shifted - log_sums, log_sums + maxes.squeeze(-1), None
    sums = torch.exp(shifted, out=exps).sum(dim=-1)
    log_sums = sums.log()
    # An impossible token (l = −inf, e^s = 0) must contribute 0 to Σ e^s·s, not 0·(−inf) = NaN.
    shifted.clamp_(min=torch.finfo(shifted.dtype).min)
    expected = torch.bmm(exps.unsqueeze(1), shifted.unsqueeze(2)).view(-1) / sums
    return label_shifted - log_sums, log_sums + maxes.squeeze(-1), log_sums - expected


def _chunk_logit_grad(logits: Tensor, lse: Tensor, labels: Tensor, grad: Tensor) -> Tensor:
    """d(Σ grad·logprob)/d logits for one chunk, grad·(onehot(label) − softmax), in place of the float32 logits [n, V]."""
    dlogits = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
    return dlogits.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1))


def _logits_buffer(hidden: Tensor, weight: Tensor, chunk: int) -> Tensor:
    """The one float32 (or wider) [chunk, V] buffer a call writes every chunk's logits into."""
    return hidden.new_empty((min(chunk, hidden.shape[0]), weight.shape[0]), dtype=_compute_dtype(weight))


class ChunkedHeadLogProbs(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, labels [N], chunk, with_entropy) -> (logprobs [N], entropy)``,
    entropy [N], or an empty tensor without ``with_entropy``.

    Forward and backward both loop over ``chunk`` tokens; only ``logprobs`` has a gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, chunk: int, with_entropy: bool):  # type: ignore[override]
        n_tokens = hidden.shape[0]
        logprobs = hidden.new_empty(n_tokens, dtype=_compute_dtype(weight))
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        buffer = _logits_buffer(hidden, weight, chunk)
        exps = torch.empty_like(buffer) if with_entropy else None
        for start in range(0, n_tokens, chunk):
            part, n = slice(start, start + chunk), min(chunk, n_tokens - start)
            logits = _chunk_logits(buffer[:n], hidden[part], weight, bias)
            logprobs[part], lse[part], part_entropy = _chunk_forward(logits, labels[part], None if exps is None else exps[:n])
            if part_entropy is not None:
                entropy[part] = part_entropy
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
        buffer = _logits_buffer(hidden, weight, ctx.chunk)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part, n = slice(start, start + ctx.chunk), min(ctx.chunk, hidden.shape[0] - start)
            logits = _chunk_logits(buffer[:n], hidden[part], weight, bias)
            dlogits = _chunk_logit_grad(logits, lse[part], labels[part], grad_logprobs[part])
            if grad_bias is not None:
                grad_bias += dlogits.sum(dim=0)
            dlogits = dlogits.to(weight.dtype)  # as the straightforward path rounds the logits' gradient
            if grad_hidden is not None:
                grad_hidden[part] = dlogits @ weight
            if grad_weight is not None:
                _add_weight_grad(grad_weight, dlogits, hidden[part])
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def _add_weight_grad(grad_weight: Tensor, dlogits: Tensor, hidden: Tensor) -> None:
    """grad_weight += dlogits.T @ hidden, in place where the dtypes allow (no [V, H] temporary per chunk)."""
    if dlogits.dtype == hidden.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), hidden)
    else:
        grad_weight += (dlogits.t() @ hidden).to(grad_weight.dtype)


def chunked_head_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, chunk: Optional[int] = None,
    entropy: bool = True,
) -> HeadLogProbs:
    """log softmax(hidden @ weight.T + bias)[label] and the entropy of that softmax, per token.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> HeadLogProbs([N], [N] or None), float32.
    ``chunk`` tokens at a time (default: :func:`tokens_per_chunk` of V), in forward and backward.
    ``entropy=False`` skips the entropy (two passes over each chunk's logits): ``HeadLogProbs.entropy`` is None.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_head_logprobs wants hidden [N, H] and labels [N]; got {tuple(hidden.shape)}, {tuple(labels.shape)}.")
    chunk = chunk or tokens_per_chunk(weight.shape[0])
    logprobs, entropies = ChunkedHeadLogProbs.apply(hidden, weight, bias, labels.long(), chunk, entropy)
    return HeadLogProbs(logprobs=logprobs, entropy=entropies if entropy else None)
