"""The divergence guard: no non-finite loss or gradient reaches the weights.

Called once per optimiser step (each mini-batch, or each accumulation boundary), after the backward
pass and before ``optimizer.step()``. It clips the gradient norm when ``max_grad_norm`` is set (the
norm comes with the clipping), computes it otherwise, and says whether the update may be applied: a
non-finite loss or gradient norm skips it (the gradients are dropped, the optimiser state does not
move). One host sync per optimiser step, to decide.

All processes agree without a collective of their own: the gradients are averaged over the processes
in the backward pass, so a non-finite loss on one process makes the averaged gradient, and the norm
every process computes from it, non-finite everywhere. With FSDP2 each process holds a shard of the
gradients; their norm is made whole first (the all-reduce that clipping does anyway), so the verdict
is again the same everywhere. On one process the loss is checked as well. Where no norm is at hand
(FSDP1's or DeepSpeed's sharded gradients without clipping) the processes sum their loss verdicts:
one small collective per optimiser step, in that case only.

Under fp16 mixed precision the loss scaler already skips steps whose gradients overflow (and lowers
the scale): such steps are its business, so there only a non-finite loss counts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn


class GuardVerdict(NamedTuple):
    """What the guard found in one optimiser step (0-d float tensors, 1.0 = yes)."""

    skipped: Tensor  # the update was not applied
    loss_nonfinite: Tensor  # this process's loss was not finite


def guard_update(accelerator: Accelerator, model: nn.Module, loss: Tensor, max_grad_norm: Optional[float]) -> GuardVerdict:
    """After the backward pass: clip the gradients (``max_grad_norm``) and decide whether the update
    may be applied. Between accumulation boundaries ``optimizer.step()`` does nothing, so nothing is
    decided there (a non-finite gradient stays in the sum and is found at the boundary)."""
    if not accelerator.sync_gradients:
        return GuardVerdict(torch.zeros((), device=loss.device), (~torch.isfinite(loss.detach())).float())
    return check_update(accelerator, loss, gradient_norm(accelerator, model, max_grad_norm))


def gradient_norm(accelerator: Accelerator, model: nn.Module, max_grad_norm: Optional[float]) -> Optional[Tensor]:
    """The total gradient norm over all processes, after clipping it to ``max_grad_norm`` when that is
    set. FSDP2 (the engine's ``sharding="fsdp2"`` or Accelerate's): the gradients are DTensor shards and
    the norm of each is made whole (one small all-reduce, as the clipping itself does). None where the
    norm is not at hand without a collective of its own (FSDP1's flat shards, DeepSpeed) and no clipping."""
    if max_grad_norm is not None:
        return _whole(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or (kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False)):
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    parts = [_whole(torch.nn.utils.get_total_norm(group)) for group in (sharded, plain) if group]
    return torch.linalg.vector_norm(torch.stack(parts)) if len(parts) > 1 else parts[0]


def _whole(norm: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor norm (partial on each process) as the plain global value; others as they are."""
    return norm.full_tensor() if norm is not None and hasattr(norm, "full_tensor") else norm


def nonfinite_warning(skipped: int, minibatches: int, step: int) -> str:
    """The library's warning for a step whose guard skipped updates."""
    return (
        f"The loss or gradient norm was not finite in {skipped} of {minibatches} mini-batch(es) of step {step}; "
        "their updates were skipped (stats ppo/nonfinite_minibatches). Try a lower learning rate or set max_grad_norm."
    )


def check_update(accelerator: Accelerator, loss: Tensor, norm: Optional[Tensor]) -> GuardVerdict:
    """Whether the update of this optimiser step must be skipped (see the module docstring)."""
    loss_bad = ~torch.isfinite(loss.detach())
    if norm is not None and accelerator.scaler is None:
        norm_bad = ~torch.isfinite(norm)  # global: the same verdict on every process
        bad = norm_bad if accelerator.num_processes > 1 else loss_bad | norm_bad
    elif accelerator.num_processes > 1:
        # Only the local loss to go by (sharded unclipped gradients, or fp16's scaler): agree on it.
        bad = accelerator.reduce(loss_bad.float(), reduction="sum") > 0
    else:
        bad = loss_bad
    return GuardVerdict(bad.float(), loss_bad.float())
