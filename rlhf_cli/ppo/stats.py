"""Typed results of one PPO step, flattened to legacy TRL's metric names at the edge (docs/architecture.md, "Metric names").

Pure functions (no collectives, no optimiser): :func:`minibatch_stats` assembles one mini-batch's
stats; inside the trainer everything stays a tensor on the device; :func:`assemble_step_stats`
makes the one host transfer per step and returns TRL's flat dict (plain floats and a few numpy
arrays for histograms) with the typed values the step's control flow reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from rlhf_cli.algo.functional import PolicyLoss, ValueLoss, masked_mean, masked_var
from rlhf_cli.ppo.distributed import sum_shares
from rlhf_cli.ppo.guard import GuardVerdict
from rlhf_cli.ppo.timing import PhaseTimer

if TYPE_CHECKING:
    from accelerate import Accelerator


class MiniBatchStats(NamedTuple):
    """0-d tensors of one optimisation mini-batch (detached)."""

    policy_loss: Tensor
    value_loss: Tensor
    total_loss: Tensor
    entropy: Tensor
    approxkl: Tensor
    policykl: Tensor
    clipfrac: Tensor
    advantages_mean: Tensor
    ratio: Tensor
    returns_mean: Tensor
    returns_var: Tensor
    vpred: Tensor
    val_error: Tensor
    val_clipfrac: Tensor
    val_mean: Tensor
    val_var: Tensor
    kl_loss: Tensor  # the KL loss term before its coefficient (NaN when kl_loss_coef is 0)
    skipped: Tensor  # 1.0 when the ratio threshold zeroed this mini-batch's loss
    nonfinite: Tensor  # 1.0 when the divergence guard (ppo.guard) skipped this mini-batch's update
    nonfinite_loss: Tensor  # 1.0 when this process's loss was not finite (summed over processes)


# TRL's flat names of the MiniBatchStats fields (the TRL layer's loss() and record_step_stats use them too).
TRAIN_NAMES = {
    "policy_loss": "ppo/loss/policy",
    "value_loss": "ppo/loss/value",
    "total_loss": "ppo/loss/total",
    "entropy": "ppo/policy/entropy",
    "approxkl": "ppo/policy/approxkl",
    "policykl": "ppo/policy/policykl",
    "clipfrac": "ppo/policy/clipfrac",
    "advantages_mean": "ppo/policy/advantages_mean",
    "ratio": "ppo/policy/ratio",
    "returns_mean": "ppo/returns/mean",
    "returns_var": "ppo/returns/var",
    "vpred": "ppo/val/vpred",
    "val_error": "ppo/val/error",
    "val_clipfrac": "ppo/val/clipfrac",
    "val_mean": "ppo/val/mean",
    "val_var": "ppo/val/var",
    "kl_loss": "ppo/loss/kl",
}
# Reported only with a critic (gae): the value head's fields and the returns it regresses on.
CRITIC_FIELDS = frozenset({
    "value_loss", "returns_mean", "returns_var", "vpred", "val_error", "val_clipfrac", "val_mean", "val_var",
})


# MiniBatchStats fields that each process computes as its share of a mean over the global mini-batch
# (they depend on its own forward pass); the others are computed from the whole mini-batch's rollout.
SHARE_FIELDS = (
    "policy_loss", "value_loss", "total_loss", "entropy", "approxkl", "policykl", "clipfrac",
    "vpred", "val_error", "val_clipfrac", "kl_loss", "nonfinite_loss",
)


def sum_minibatch_shares(accelerator: Accelerator, collected: list[MiniBatchStats]) -> list[MiniBatchStats]:
    """Every mini-batch's stats with the processes' shares (:data:`SHARE_FIELDS`) added up: one
    collective per step; the collected stats themselves on one process."""
    if accelerator.num_processes == 1:
        return collected
    columns = [MiniBatchStats._fields.index(name) for name in SHARE_FIELDS]
    return [MiniBatchStats(*row.unbind()) for row in sum_shares(accelerator, collected, columns)]


class WholeMiniBatch(NamedTuple):
    """Rollout tensors of a whole global mini-batch (every process holds them): [M, t]; returns and
    old values are None without a critic."""

    advantages: Tensor
    returns: Tensor | None
    old_values: Tensor | None
    mask: Tensor


def minibatch_stats(
    pl: PolicyLoss,
    vl: ValueLoss | None,
    kl_term: Tensor | None,
    loss: Tensor,
    entropy: Tensor,
    mask: Tensor,
    token_count: Tensor,
    ratio_mean: Tensor,
    ratio_threshold: float,
    whole: WholeMiniBatch,
    verdict: GuardVerdict,
) -> MiniBatchStats:
    """The stats of one optimisation mini-batch (pure: no gradient, no collective). ``pl``, ``vl``,
    ``kl_term``, ``loss``, ``entropy`` (per token, [B, T]) and ``mask`` are this process's share; ``whole`` is the global
    mini-batch. Without a critic (``vl`` None) the value fields are NaN, without a KL loss term
    ``kl_loss`` is; :func:`assemble_step_stats` leaves them out."""
    skipped = (ratio_mean > ratio_threshold).float()
    keep = 1.0 - skipped  # legacy TRL reports zero losses for a skipped mini-batch
    with torch.no_grad():
        critic = _critic_stats(vl, keep, whole, token_count) if vl is not None else _absent_critic_stats(loss)
        return MiniBatchStats(
            policy_loss=pl.loss.detach() * keep,
            total_loss=loss.detach(),
            entropy=masked_mean(entropy.detach(), mask, count=token_count),
            approxkl=pl.approxkl,
            policykl=pl.policykl,
            clipfrac=pl.clipfrac,
            advantages_mean=masked_mean(whole.advantages, whole.mask),
            ratio=ratio_mean,
            kl_loss=kl_term.detach() if kl_term is not None else _nan(loss),
            skipped=skipped,
            nonfinite=verdict.skipped,
            nonfinite_loss=verdict.loss_nonfinite,
            **critic,
        )


def _nan(like: Tensor) -> Tensor:
    return torch.full((), float("nan"), device=like.device)


def _critic_stats(vl: ValueLoss, keep: Tensor, whole: WholeMiniBatch, token_count: Tensor) -> dict[str, Tensor]:
    """The value head's stats; ``token_count`` (``whole.mask``'s count) spares the variances a host sync each."""
    return dict(
        value_loss=vl.loss.detach() * keep,
        returns_mean=masked_mean(whole.returns, whole.mask),
        returns_var=masked_var(whole.returns, whole.mask, count=token_count),
        vpred=vl.vpred_mean,
        val_error=vl.error,
        val_clipfrac=vl.clipfrac,
        val_mean=masked_mean(whole.old_values, whole.mask),
        val_var=masked_var(whole.old_values, whole.mask, count=token_count),
    )


def _absent_critic_stats(like: Tensor) -> dict[str, Tensor]:
    return {name: _nan(like) for name in CRITIC_FIELDS}


class RolloutStats(NamedTuple):
    """Per-step quantities of the whole (global) batch."""

    kl_per_sample: Tensor  # [B] summed per-token KL of each sample
    neg_logprob_sum: Tensor  # [B] summed -logprob of each sample (sampled-token entropy estimate)
    mean_non_score_reward: Tensor  # 0-d
    scores: Tensor  # [B] processed scores, as used in the reward
    query_lengths: Tensor  # [B]
    response_lengths: Tensor  # [B]
    logprobs: Tensor  # [b, T] this process's logprobs (for histograms)
    ref_logprobs: Tensor  # [b, T]


def rollout_stats(
    *,
    kl: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    non_score: Tensor,
    mask: Tensor,
    scores: Tensor,
    query_lengths: Sequence[int],
    response_lengths: Sequence[int],
) -> RolloutStats:
    """The rollout's record from per-token [B, T] tensors (KL, logprobs, non-score rewards, mask),
    scores [B] and the samples' lengths: one construction for ``step()`` and TRL's ``record_step_stats``."""
    device = mask.device
    return RolloutStats(
        kl_per_sample=(kl * mask).sum(dim=-1),
        neg_logprob_sum=(-logprobs * mask).sum(dim=-1),
        mean_non_score_reward=masked_mean(non_score, mask.bool()),
        scores=scores,
        query_lengths=torch.tensor([float(n) for n in query_lengths], device=device),
        response_lengths=torch.tensor([float(n) for n in response_lengths], device=device),
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
    )


class StepStats(NamedTuple):
    """A step's stats on the host: TRL's flat dict, and the typed values the step's control flow reads."""

    flat: dict[str, float | np.ndarray]  # legacy TRL's names
    kl: float  # mean summed KL per sample: what the KL controller is updated with
    skipped_minibatches: int  # mini-batches whose loss the ratio threshold zeroed
    nonfinite_minibatches: int = 0  # mini-batches whose update the divergence guard skipped
    minibatches: int = 0  # mini-batches of the step


def assemble_step_stats(
    rollout: RolloutStats,
    minibatches: Sequence[MiniBatchStats],
    *,
    kl_coef: float,
    learning_rate: float,
    timings: dict[str, float],
    critic: bool = True,
    kl_loss_coef: float = 0.0,
    advantages: Tensor | None = None,
) -> StepStats:
    """Legacy TRL's stats dict (objective/*, ppo/*, tokens/*, time/ppo/*) and the typed values of a step.

    Without a ``critic`` the value head's stats (ppo/loss/value, ppo/returns/*, ppo/val/*) are left
    out; with a KL loss term (``kl_loss_coef`` > 0) ``ppo/loss/kl`` and ``objective/kl_loss_coef``
    are added. ``kl_coef`` is the β of the reward-side penalty (0 when the KL is not in the reward).
    ``advantages``, the batch's advantages at its response tokens (flat), become the
    ``ppo/policy/advantages`` histogram array."""
    # One host transfer for all mini-batch scalars: [num_minibatches, num_fields].
    table = torch.stack([torch.stack([t.float() for t in mb]) for mb in minibatches]).cpu()
    fields = MiniBatchStats._fields
    means = _finite_means(table, fields.index("nonfinite"))
    stats = _rollout_entries(rollout, kl_coef)
    if advantages is not None:
        stats["ppo/policy/advantages"] = advantages.detach().float().cpu().numpy()
    if kl_loss_coef > 0:
        stats["objective/kl_loss_coef"] = float(kl_loss_coef)
    for index, field in enumerate(fields):
        if field in TRAIN_NAMES and _reported(field, critic, kl_loss_coef):
            stats[TRAIN_NAMES[field]] = float(means[index])
    if critic:
        returns_var = stats["ppo/returns/var"]
        stats["ppo/val/var_explained"] = 1.0 - stats["ppo/val/error"] / returns_var if returns_var > 0 else 0.0
    stats["ppo/skipped_minibatches"] = float(table[:, fields.index("skipped")].sum())
    stats["ppo/nonfinite_minibatches"] = float(table[:, fields.index("nonfinite")].sum())
    stats["ppo/nonfinite_loss_minibatches"] = float((table[:, fields.index("nonfinite_loss")] > 0).sum())
    stats["ppo/minibatches"] = float(table.shape[0])
    stats["ppo/learning_rate"] = float(learning_rate)
    for name, seconds in timings.items():
        stats[f"time/ppo/{name}"] = float(seconds)
    return StepStats(
        stats,
        kl=stats["objective/kl"],
        skipped_minibatches=int(stats["ppo/skipped_minibatches"]),
        nonfinite_minibatches=int(stats["ppo/nonfinite_minibatches"]),
        minibatches=table.shape[0],
    )


def _finite_means(table: Tensor, nonfinite_column: int) -> Tensor:
    """Column means over the mini-batches whose update was applied: a skipped non-finite one would
    make every mean NaN (and its count is reported on its own). All skipped: NaN."""
    applied = table[:, nonfinite_column] == 0
    if not bool(applied.any()):
        return torch.full((table.shape[1],), float("nan"))
    return table[applied].mean(dim=0)


def _std(values: Tensor) -> float:
    return float(values.std()) if values.numel() > 1 else 0.0


def _rollout_entries(rollout: RolloutStats, kl_coef: float) -> dict[str, float | np.ndarray]:
    """The objective/*, ppo/mean_* and tokens/* entries of a step, from its rollout record."""
    kl = rollout.kl_per_sample.float().cpu()
    scores = rollout.scores.float().cpu()
    qlen = rollout.query_lengths.float().cpu()
    rlen = rollout.response_lengths.float().cpu()
    return {
        "objective/kl": float(kl.mean()),
        "objective/kl_dist": kl.numpy(),
        "objective/logprobs": rollout.logprobs.float().cpu().numpy(),
        "objective/ref_logprobs": rollout.ref_logprobs.float().cpu().numpy(),
        "objective/kl_coef": float(kl_coef),
        "objective/entropy": float(rollout.neg_logprob_sum.float().cpu().mean()),
        "ppo/mean_non_score_reward": float(rollout.mean_non_score_reward.cpu()),
        "ppo/mean_scores": float(scores.mean()),
        "ppo/std_scores": _std(scores),
        "tokens/queries_len_mean": float(qlen.mean()),
        "tokens/queries_len_std": _std(qlen),
        "tokens/responses_len_mean": float(rlen.mean()),
        "tokens/responses_len_std": _std(rlen),
        "tokens/queries_dist": qlen.numpy(),
        "tokens/responses_dist": rlen.numpy(),
    }


def record_final_timings(flat: dict[str, float | np.ndarray], timer: PhaseTimer) -> None:
    """Add to a step's stats what is known only once they are built, as TRL reports it: the time
    they took (``time/ppo/calc_stats``) and a ``time/ppo/total`` that includes it."""
    flat["time/ppo/calc_stats"] = timer.seconds["calc_stats"]
    flat["time/ppo/total"] = timer.elapsed()


def _reported(field: str, critic: bool, kl_loss_coef: float) -> bool:
    if field in CRITIC_FIELDS:
        return critic
    if field == "kl_loss":
        return kl_loss_coef > 0
    return True



def flatten_step_stats(
    rollout: RolloutStats,
    minibatches: Sequence[MiniBatchStats],
    *,
    kl_coef: float,
    learning_rate: float,
    timings: dict[str, float],
) -> dict[str, float | np.ndarray]:
    """Legacy TRL's stats dict only (see :func:`assemble_step_stats`)."""
    return assemble_step_stats(rollout, minibatches, kl_coef=kl_coef, learning_rate=learning_rate, timings=timings).flat


def scalar_stats(stats: dict[str, object]) -> dict[str, float]:
    """The scalar entries of a stats dict (what trackers and metrics.jsonl take)."""
    return {
        key: float(value)
        for key, value in stats.items()
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    }


def reward_stats(rewards: Tensor) -> dict[str, float]:
    """``env/reward_mean`` and ``env/reward_std`` of the (gathered) rewards of a step."""
    rewards = rewards.float().cpu()
    return {
        "env/reward_mean": float(rewards.mean()),
        "env/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
    }
