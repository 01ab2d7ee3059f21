"""Pure PPO math: log-probabilities, masked statistics, score processing, rewards, GAE, losses
(the KL estimates are in :mod:`rlhf_cli.algo.kl`).

Per-token tensors are response-aligned [B, T] (T = longest response in the batch). ``mask`` is
[B, T], bool or float, nonzero on real response tokens. Masked positions may hold anything
(padding garbage, even inf): every function selects with ``torch.where`` instead of multiplying
by the mask, so such values never reach a result or, as NaN, a gradient.

Nothing here synchronises with the host except where a docstring says so.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from rlhf_cli.algo.running_moments import RunningMoments

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# Log-probabilities and entropy -------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


class _UpcastLogSumExp(torch.autograd.Function):
    """logsumexp over the last dim, computed in at least float32.

    ``torch.logsumexp(logits.float())`` would keep the float32 copy of the [..., V] logits
    alive in the autograd graph until backward (twice the size of bf16 logits). This function
    saves only the original logits and the [...] result and rebuilds the softmax in backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        lse = torch.logsumexp(logits.to(_compute_dtype(logits.dtype)), dim=-1)
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        logits, lse = ctx.saved_tensors
        probs = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(-1))
        return (grad.unsqueeze(-1) * probs).to(logits.dtype)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-softmax probability of ``labels`` under ``logits``: [..., V], [...] -> [...].

    Gathers the label logit and subtracts the logsumexp instead of materialising a
    log-softmax [..., V]. Half-precision logits are upcast for the logsumexp and the result
    is float32: a bf16 logprob has about two significant digits, too coarse for the PPO ratio.
    """
    label_logits = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if logits.dtype in _HALF_DTYPES:
        lse = _UpcastLogSumExp.apply(logits)
    else:
        lse = torch.logsumexp(logits, dim=-1)
    return label_logits.to(lse.dtype) - lse


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: [..., V] -> [...].

    logsumexp(l) − Σ softmax(l)·l, with l shifted by its max first: the two terms are then
    small and their difference does not cancel catastrophically. Vocabulary entries with
    −inf logits (probability 0) contribute 0. Half precision is computed and returned in float32.
    """
    logits = logits.to(_compute_dtype(logits.dtype))
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(shifted, dim=-1)
    # 0 · (−inf) is NaN; an impossible token contributes nothing. Replacing the logit (not the
    # product) also keeps the gradient of such entries at 0 instead of NaN.
    finite = torch.where(probs > 0, shifted, torch.zeros_like(shifted))
    return torch.logsumexp(shifted, dim=-1) - (probs * finite).sum(dim=-1)


# Masked statistics -------------------------------------------------------------------------------


def _bool_mask(values: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but values have shape {tuple(values.shape)}; they must match.")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(
    values: Tensor, mask: Tensor, axis: int | None = None, *, count: Tensor | float | None = None
) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is set: [...], [...] -> [] (or reduced ``axis``).

    ``count`` (only with ``axis=None``) replaces the number of selected positions as the divisor.
    When the positions of one mean are split over processes, each process divides its own sum by
    the count of all of them, and the processes' results add up to the mean of the whole.
    An empty mask (or an empty row along ``axis``) gives NaN (0/0); checking would cost a sync.
    """
    selected = _bool_mask(values, mask)
    total = torch.where(selected, values, torch.zeros_like(values)).sum(dim=axis)
    if count is None:
        return total / selected.sum(dim=axis)
    if axis is not None:
        raise ValueError("masked_mean: count applies to the mean over all positions (axis=None) only.")
    return total / count


def _masked_mean_var(values: Tensor, mask: Tensor, unbiased: bool, count: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    selected = _bool_mask(values, mask)
    if count is None:
        count = int(selected.sum())  # host sync: the empty check and Bessel's factor need the count
        if count == 0:
            raise ValueError("masked_var got an empty mask: no position is selected, so there is no variance to compute.")
    mean = masked_mean(values, selected)
    # Centre before squaring (two-pass): stable when the mean is large relative to the spread.
    centred = torch.where(selected, values - mean, torch.zeros_like(values))
    var = centred.square().sum() / count
    if unbiased:
        var = var * _bessel(count, var.dtype)
    return mean, var


def _bessel(count: int | Tensor, dtype: torch.dtype) -> float | Tensor:
    """n/(n−1), and 0 for one value (it has no spread: 0 instead of 0 · n/(n−1) = 0/0). A tensor count
    gets the factor on the device, computed in float64 and rounded to ``dtype`` as the host's float is."""
    if not isinstance(count, Tensor):
        return count / (count - 1) if count > 1 else 0.0
    n = count.to(torch.float64)
    return torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n)).to(dtype)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True, count: Optional[Tensor] = None) -> Tensor:
    """Variance of ``values`` around their masked mean over the masked positions: [...] -> [].

    ``unbiased`` applies Bessel's correction n/(n−1). With a single selected value the unbiased
    variance is returned as 0 (one value has no spread) rather than NaN. Raises ValueError
    for an empty mask. Synchronises with the host once (to count the mask), unless the caller
    passes ``count``, the number of selected positions as a tensor it already holds: then nothing
    is read on the host, and an empty mask gives NaN (as :func:`masked_mean` with ``count``).
    """
    return _masked_mean_var(values, mask, unbiased, count)[1]


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values − mean)·rsqrt(var + eps) with masked mean and unbiased masked variance: [...] -> [...].

    With ``shift_mean=False`` the mean is added back (only the scale changes). Positions outside
    the mask go through the same affine map; callers mask them. One host sync (see masked_var).
    """
    mean, var = _masked_mean_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def whiten(values: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values − mean)·rsqrt(var + eps) over all elements (unbiased variance): [...] -> [...].

    A single element has variance 0 (as in masked_var). Raises ValueError for an empty tensor.
    """
    if values.numel() == 0:
        raise ValueError("whiten got an empty tensor; there is nothing to whiten.")
    mean = values.mean()
    var = values.var(unbiased=True) if values.numel() > 1 else torch.zeros_like(mean)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def clip_by_value(x: Tensor, tensor_min: Tensor, tensor_max: Tensor) -> Tensor:
    """Elementwise clip of ``x`` to [tensor_min, tensor_max] (broadcasting bounds)."""
    return torch.minimum(torch.maximum(x, tensor_min), tensor_max)


# Scores and per-token rewards --------------------------------------------------------------------


def process_scores(
    scores: Tensor,
    *,
    running: RunningMoments | None,
    use_score_norm: bool,
    score_clip: float | None,
    gathered: Tensor | None = None,
) -> Tensor:
    """Score scaling, normalisation and clipping, in legacy TRL's order: [B] -> [B].

    1. If ``running`` is given (score scaling on): update it with ``gathered`` (the scores of
       all processes, so every rank holds the same moments; defaults to ``scores``), then divide
       by (running std + eps of the dtype), subtracting the running mean first if
       ``use_score_norm``. ``use_score_norm`` has no effect without ``running``.
    2. If ``score_clip`` is set: clip to [−score_clip, score_clip].

    Updating ``running`` transfers the scores to the host (one sync).
    """
    if score_clip is not None and not score_clip > 0:
        raise ValueError(f"score_clip must be positive or None, got {score_clip!r}.")
    if running is not None:
        running.update(scores if gathered is None else gathered)
        eps = torch.finfo(scores.dtype).eps
        centred = scores - running.mean if use_score_norm else scores
        scores = centred / (running.std + eps)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return scores


class RewardTerms(NamedTuple):
    """Per-token rewards [B, T] and their KL part [B, T] (both 0 outside the mask)."""

    rewards: Tensor
    non_score_rewards: Tensor


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> RewardTerms:
    """r_t = −kl_coef·kl_t on response tokens, plus the score at each row's last masked token.

    scores [B], kl [B, T], mask [B, T] -> RewardTerms(rewards [B, T], non_score_rewards [B, T]).
    Raises ValueError if a row's mask is empty (one host sync for that check).
    """
    selected = _bool_mask(kl, mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must have shape [B] = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}.")
    non_score = torch.where(selected, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(kl.shape[1], device=kl.device).expand_as(selected)
    last = torch.where(selected, positions, torch.full_like(positions, -1)).amax(dim=1)  # [B]
    if bool((last < 0).any()):
        empty = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"per_token_rewards: rows {empty} have an empty mask; every sample needs a response token.")
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards = non_score.index_put((rows, last), scores.to(kl.dtype), accumulate=True)
    return RewardTerms(rewards=rewards, non_score_rewards=non_score)


# Advantages --------------------------------------------------------------------------------------


class Advantages(NamedTuple):
    """Advantages [B, T] and returns [B, T] (raw advantages + values; None for an estimator without a
    critic), 0 outside the mask."""

    advantages: Tensor
    returns: Tensor | None


def gae(
    values: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> Advantages:
    """Generalised advantage estimation over response tokens: [B, T] x3 -> Advantages.

    Values and rewards are zeroed outside the mask, so V after the last token is 0.
    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, recursing over T (vectorised
    over B). Returns R = A + V; A is then whitened over the mask. With ``whiten_rewards`` the
    rewards are first whitened over the mask without shifting their mean.

    The recursion runs over positions, so the mask must not have gaps inside a row (right- or
    left-padding is fine). One or two host syncs (masked_whiten's count).
    """
    selected = _bool_mask(values, mask)
    if rewards.shape != values.shape or values.dim() != 2:
        raise ValueError(f"values and rewards must both be [B, T]; got {tuple(values.shape)} and {tuple(rewards.shape)}.")
    zeros = torch.zeros_like(values)
    values = torch.where(selected, values, zeros)
    rewards = torch.where(selected, rewards, zeros)
    if whiten_rewards:
        # Re-mask: whitening maps padding 0s to nonzero values that would leak into A_{t+1}.
        rewards = torch.where(selected, masked_whiten(rewards, selected, shift_mean=False), zeros)

    next_value = zeros[:, 0]
    next_advantage = zeros[:, 0]
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[:, t]
        reversed_advantages.append(next_advantage)
    raw = torch.stack(reversed_advantages[::-1], dim=1)

    returns = torch.where(selected, raw + values, zeros)
    advantages = torch.where(selected, masked_whiten(raw, selected), zeros)
    return Advantages(advantages=advantages, returns=returns)


# Losses ------------------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
    """Clipped policy loss (with graph) and its detached 0-d statistics."""

    loss: Tensor
    clipfrac: Tensor
    approxkl: Tensor
    policykl: Tensor
    ratio_mean: Tensor


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    *,
    token_count: Tensor | float | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate: mean_m max(−A·ρ, −A·clip(ρ, 1−c, 1+c)), ρ = exp(logπ − logπ_old).

    [B, T] x4 -> PolicyLoss of 0-d tensors. clipfrac is the share of tokens where the clipped
    term is strictly larger; approxkl = ½·mean_m (logπ − logπ_old)²; policykl = mean_m
    (logπ_old − logπ); ratio_mean = mean_m ρ. Every mean divides by ``token_count`` when given
    (a mini-batch split over processes: see :func:`masked_mean`), else by the mask's count.
    """
    selected = _bool_mask(logprobs, mask)
    # Mask the log-ratio before exp: an overflowing ratio at a padding position would turn the
    # zero gradient that torch.where sends there into 0·inf = NaN.
    log_ratio = torch.where(selected, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), selected, count=token_count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), selected, count=token_count)
        approxkl = 0.5 * masked_mean(log_ratio.square(), selected, count=token_count)
        policykl = masked_mean(-log_ratio, selected, count=token_count)
        ratio_mean = masked_mean(ratio, selected, count=token_count)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approxkl=approxkl, policykl=policykl, ratio_mean=ratio_mean)


class ValueLoss(NamedTuple):
    """Clipped value loss (with graph) and its detached 0-d statistics."""

    loss: Tensor
    clipfrac: Tensor
    vpred_mean: Tensor
    error: Tensor


def value_loss(
    vpreds: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    *,
    token_count: Tensor | float | None = None,
) -> ValueLoss:
    """Clipped value loss: ½·mean_m max((V̂−R)², (V̂ᶜ−R)²), V̂ᶜ = clip(V̂, V_old − c, V_old + c).

    [B, T] x4 -> ValueLoss of 0-d tensors. clipfrac is the share of tokens where the clipped
    error is strictly larger; vpred_mean = mean_m V̂; error = mean_m (V̂ − R)². Every mean
    divides by ``token_count`` when given (see :func:`policy_loss`), else by the mask's count.
    """
    selected = _bool_mask(vpreds, mask)
    vclipped = clip_by_value(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (vpreds - returns).square()
    clipped_error = (vclipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), selected, count=token_count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).to(vpreds.dtype), selected, count=token_count)
        vpred_mean = masked_mean(vpreds, selected, count=token_count)
        error = masked_mean(unclipped_error, selected, count=token_count)
    return ValueLoss(loss=loss, clipfrac=clipfrac, vpred_mean=vpred_mean, error=error)


def ratio_guard(loss: Tensor, ratio_mean: Tensor, ratio_threshold: float) -> Tensor:
    """``loss`` unless ``ratio_mean > ratio_threshold``, else a zero that keeps the graph.

    Backward through the zero gives every parameter a zero gradient, so DDP's gradient
    all-reduce still runs on all ranks. ``torch.where`` decides on the device: no host sync.
    """
    tripped = ratio_mean.detach() > ratio_threshold
    return torch.where(tripped, torch.zeros_like(loss), loss)
