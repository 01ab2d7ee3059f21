"""Comparing two training runs that should compute the same thing in a different float order.

Two runs of the same PPO steps that differ only in how the arithmetic is grouped — 1 process vs 2
(each summing half the batch, then an all-reduce), gradient accumulation vs one big mini-batch,
gradient checkpointing's recomputation, or the same code on another CPU (AMD EPYC's AVX-512 vs
Intel's AMX matmul kernels block their sums differently) — agree only up to rounding. A fixed
absolute tolerance on weights measures the rounding of one machine, not the engine. Here the
tolerance is argued from the numbers instead.

What the rounding is. float32 has unit roundoff u = 2⁻²⁴ ≈ 6e-8. A gradient entry is a sum of
n ≲ 10⁴ products here (tokens × width); another summation order moves it by about √n·u ≈ 1e-5 of its
scale. One SGD update carries that relative error. The next update starts from weights already
perturbed, and the loss surface amplifies the perturbation: measured over the second step's 8–12
updates at lr 0.5, the difference grows ×10 (AMD) to ×100 (Intel).

What it looks like, measured. The largest difference of an update (weights after minus weights
before), relative to the largest entry of that tensor's update: ≤ 3e-6 on AMD EPYC, ≤ 5e-5 on an
Intel Xeon with AMX (2.8e-5 on `wte` updates of 0.55, two steps of the `accumulation` scenario).
Issue 23's forward (a contiguous LM-head input, the chunked head's log-softmax as ``(l − max) −
logsumexp``) rounds differently from the old [B, T, V] logits path, and the `accumulation` scenario's
second step (lr 0.5, three epochs, early stopping) amplifies that: on AMD EPYC 1 vs 2 processes now
differ by 2.3e-4 after the second step (3.3e-5 before issue 23). Rounding, not a bug: with the same initial
weights cast to float64 the two runs agree to 6e-14 (updates) and bit for bit (policykl), and every
float32 run is that far from the float64 one — the 1-process reference 1.4e-4, 2 processes 3.7e-4.

The rule. ``max|Δa − Δb| ≤ rtol · max|Δa| + floor`` per tensor, Δ the update since ``initial``:

* ``SGD_RTOL = 5e-3``: 20× above the worst difference measured (2.3e-4, above), and 100× below what
  a wrong gradient scale gives — a missing ×P on 2 processes halves every SGD update (relative
  difference 0.5), a sum where a mean belongs doubles it.
* A signed mean over tokens whose terms cancel (policykl = mean(−log r), log r the per-token
  log-ratio) is rounded relative to the terms, not to the mean: its tolerance is the rule's rtol
  times rms(log r) / |mean(log r)| (:func:`signed_mean_rtol`). Measured in `accumulation`'s second
  step: rms 0.50 (√(2·approxkl)), policykl 0.0193, a factor 26; 1 vs 2 processes differ by 1.1e-3
  in policykl, 5× their updates' 2.3e-4; each float32 run is 0.6e-3 (1 process) and 1.75e-3
  (2 processes) from float64.
* ``ADAM_RTOL = 5e-2``: Adam divides each entry by the root of its own second moment, so an entry
  whose gradient nearly cancels (large *relative* rounding error) takes a step of the learning
  rate's size in a direction partly set by rounding. Measured: ≤ 3e-3 (AMD) and below 1.7e-2
  (Intel, where the old atol=1e-5 on 6e-4 updates held). Adam is scale-invariant, so it cannot see
  a gradient-scale error anyway; its scenario checks sharding, whitening and state handling, which
  go wrong by O(1).
* ``floor = 4·u·max|w|``: the update is computed as a difference of two float32 weights, each
  rounded to half an ulp of its magnitude, so it carries that much error even when both runs are
  exact. It matters only for tensors that barely move.

Branches are compared first and exactly (:func:`assert_same_branches`): a scenario whose decision
statistic (early stopping's policykl against 1.5·target_kl) lies within rounding distance of its
threshold is reported as ill-conditioned instead of failing on one machine and passing on another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

UNIT_ROUNDOFF = 2.0**-24
SGD_RTOL = 5e-3
ADAM_RTOL = 5e-2
# A decision statistic must lie at least this far (relative) from its threshold: 1000× the
# relative rounding of the statistic itself, so both runs decide alike unless something is wrong.
DECISION_MARGIN = 1e-2


def signed_mean_rtol(rtol: float, mean: float, rms: float) -> float:
    """The relative tolerance of a mean of signed per-token terms of root-mean-square ``rms`` whose own
    relative rounding is ``rtol``: cancellation scales it by rms / |mean| (at least 1)."""
    return rtol * max(1.0, rms / abs(mean)) if mean else rtol


def update_differences(
    initial: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    actual: Mapping[str, torch.Tensor],
    rtol: float,
) -> list[str]:
    """The tensors whose update since ``initial`` differs between ``expected`` and ``actual`` by more
    than rounding explains (the rule in the module docstring), one line each; empty when they agree."""
    if expected.keys() != actual.keys():
        return [f"different tensors: {sorted(set(expected) ^ set(actual))}"]
    problems = []
    for key, start in initial.items():
        start = start.detach().double()
        update_expected = expected[key].detach().double() - start
        update_actual = actual[key].detach().double() - start
        difference = (update_actual - update_expected).abs().max().item()
        scale = update_expected.abs().max().item()
        floor = 4 * UNIT_ROUNDOFF * max(start.abs().max().item(), expected[key].detach().double().abs().max().item())
        allowed = rtol * scale + floor
        if difference > allowed:
            problems.append(f"{key}: update differs by {difference:.3e} > {allowed:.3e} (largest update {scale:.3e})")
    return problems


def assert_same_update(
    initial: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    actual: Mapping[str, torch.Tensor],
    rtol: float = SGD_RTOL,
    what: str = "",
) -> None:
    """Fail unless both runs moved every tensor the same way up to rounding (module docstring)."""
    problems = update_differences(initial, expected, actual, rtol)
    assert not problems, f"{what}: " + "; ".join(problems[:5])


def assert_same_branches(expected: Sequence[Mapping], actual: Sequence[Mapping]) -> None:
    """Both runs took the same decisions, and the decisions were not a rounding coin-flip.

    Each element describes one PPO step: ``updates`` (optimiser steps taken), ``decisions`` (each
    early-stopping check as ``(statistic, threshold, stopped)``). The expected run's statistics must
    lie at least ``DECISION_MARGIN`` (relative) from their thresholds.
    """
    for step, (one, two) in enumerate(zip(expected, actual, strict=True)):
        for statistic, threshold, _ in one["decisions"]:
            gap = abs(statistic - threshold) / abs(threshold)
            assert gap > DECISION_MARGIN, (
                f"step {step}: early-stopping statistic {statistic:.6g} lies within {gap:.1e} of its threshold "
                f"{threshold:.6g}: the scenario is ill-conditioned (rounding could flip the decision); change it"
            )
        assert [d[2] for d in two["decisions"]] == [d[2] for d in one["decisions"]], f"step {step}: different early stops"
        assert two["updates"] == one["updates"], f"step {step}: {two['updates']} optimiser steps vs {one['updates']}"
