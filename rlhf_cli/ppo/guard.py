"""The divergence guard: no non-finite loss or gradient reaches the weights.

Called once per optimiser step (each mini-batch, or each accumulation boundary), after the backward
pass and before ``optimizer.step()``. It clips the gradient norm when ``max_grad_norm`` is set (the
norm comes with the clipping), computes it otherwise, and says whether the update may be applied: a
non-finite loss or gradient norm skips it (the gradients are dropped, the optimiser state does not
move). One host sync per optimiser step, to decide.

All processes agree without a collective of their own: the gradients are averaged over the processes
in the backward pass, so a non-finite loss on one process makes the averaged gradient, and the norm
every process computes from it, non-finite everywhere. On one process the loss is checked as well.
Where no norm is at hand (sharded gradients without clipping) the processes sum their loss verdicts:
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

# Gradients sharded over the processes: their norm comes only from the sharded clip (or DeepSpeed's own).
_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


class GuardVerdict(NamedTuple):
    """What the guard found in one optimiser step (0-d float tensors, 1.0 = yes)."""

    skipped: Tensor  # the update was not applied
    loss_nonfinite: Tensor  # this process's loss was not finite


def gradient_norm(accelerator: Accelerator, model: nn.Module, max_grad_norm: Optional[float]) -> Optional[Tensor]:
    """The total gradient norm, after clipping it to ``max_grad_norm`` when that is set; None when the
    gradients are sharded and not clipped (their norm would need a collective of its own)."""
    if max_grad_norm is not None:
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    if accelerator.distributed_type in _SHARDED:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


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
