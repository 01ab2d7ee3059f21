"""KL estimates: the reward-side per-token penalty (``kl_penalty``, ``full_kl``) and the KL loss term.

Layouts as in :mod:`rlhf_cli.algo.functional`: response-aligned [B, T], masks nonzero on real tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_cli.algo.functional import _bool_mask, _compute_dtype, masked_mean
from rlhf_cli.algo.names import KL_LOSS_ESTIMATORS, KL_PENALTY_MODES

# The modes computed from sampled-token logprobs; "full" needs both models' logits (full_kl).
KL_MODES = tuple(mode for mode in KL_PENALTY_MODES if mode != "full")


# Reward-side KL penalties ------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mode: str) -> Tensor:
    """Per-token KL estimate from sampled-token logprobs: [B, T], [B, T] -> [B, T].

    With d = logprobs − ref_logprobs: ``kl`` → d, ``abs`` → |d|, ``mse`` → ½d².
    ``full`` needs the whole distributions: use :func:`full_kl` on the logits.
    """
    diff = logprobs - ref_logprobs
    if mode == "kl":
        return diff
    if mode == "abs":
        return diff.abs()
    if mode == "mse":
        return 0.5 * diff.square()
    if mode == "full":
        raise ValueError(
            "kl_penalty mode 'full' needs the logits of both models, not sampled-token logprobs; "
            "call full_kl(logits, ref_logits) instead."
        )
    raise ValueError(f"Unknown kl_penalty mode {mode!r}; valid modes are {', '.join(KL_MODES)} (and 'full' via full_kl).")


def full_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(π‖π_ref) over the vocabulary at each position: [B, T, V], [B, T, V] -> [B, T].

    Σ_v p·(log p − log q), p = softmax(logits), q = softmax(ref_logits), computed (and returned)
    in float32 (float64 stays float64). Entries with p = 0 contribute 0, even where q = 0.
    """
    dtype = _compute_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    logq = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    probs = logp.exp()
    # Where p = 0 the log-ratio may be −inf − (−inf) = NaN; such entries contribute 0.
    log_ratio = torch.where(probs > 0, logp - logq, torch.zeros_like(logp))
    return (probs * log_ratio).sum(dim=-1)


# The largest per-token k3 value (verl's bound): r − 1 − log r = 10 at log r ≈ 2.6.
K3_MAX = 10.0


def kl_loss_terms(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimates of KL(π‖π_ref) from tokens sampled from π: [B, T], [B, T] -> [B, T].

    Schulman, "Approximating KL Divergence" (2020), with log r = logπ_ref − logπ: ``k1`` = −log r
    (unbiased, high variance, can be negative), ``k2`` = ½(log r)² (biased, low variance), ``k3`` =
    (r − 1) − log r (unbiased and ≥ 0; GRPO's, Shao et al. 2024). For the loss term: the gradient
    flows through ``logprobs``.

    k3 grows like e^{log r}, and so does its gradient −(r − 1): one token the policy has made far less
    likely than the reference (log r ≈ 14 was seen in the first step of a 135M model at lr 5e-5) would
    dominate the loss by orders of magnitude and blow the update up. As in verl, log r is clamped to
    ±20 before ``exp`` and k3 to at most :data:`K3_MAX` (a token beyond it gets a constant penalty and
    no gradient from this term; the policy loss still moves it).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = log_r.clamp(-20.0, 20.0)
        return (torch.expm1(log_r) - log_r).clamp(max=K3_MAX)
    raise ValueError(f"Unknown KL-loss estimator {estimator!r}; valid: {', '.join(KL_LOSS_ESTIMATORS)}.")


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str,
    *,
    token_count: Tensor | float | None = None,
) -> Tensor:
    """The KL loss term: mean_m of :func:`kl_loss_terms` over response tokens, [B, T] x3 -> [] (with
    graph). Divides by ``token_count`` when given (see :func:`masked_mean`)."""
    selected = _bool_mask(logprobs, mask)
    # Mask before the estimate: padding logprobs may be anything, and exp of garbage could be inf.
    zeros = torch.zeros_like(logprobs)
    terms = kl_loss_terms(torch.where(selected, logprobs, zeros), torch.where(selected, ref_logprobs, zeros), estimator)
    return masked_mean(terms, selected, count=token_count)
