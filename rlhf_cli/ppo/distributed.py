"""Several processes, one PPO step: what makes P processes compute what one process computes.

The convention (the math of rlhf_cli.algo, unchanged):

* **The global batch** of a step is the concatenation, in rank order, of the processes' samples:
  row ``r·b + i`` is sample ``i`` of rank ``r`` (b samples per process, B = P·b). This is the order
  ``accelerator.gather`` returns, and the single-process reference is the trainer given these B
  samples in this order.
* **Every process holds the whole global batch's rollout**: token ids (gathered once per step) and
  the no-gradient old logprobs, values and reference logprobs (each process scores its own b rows,
  then the [b, T] results are gathered). These are O(B·T) numbers, small next to a model. Rewards,
  GAE, and the whitening of rewards and advantages then run on the whole batch, identically on every
  process, so their statistics are global without any extra reduction.
* **Mini-batches**: every process draws the same permutation of the B global rows (the trainer's
  seeded generator advances identically everywhere); global mini-batch k is rows
  ``perm[k·M : (k+1)·M]`` (M = P·m) exactly as on one process, and rank r trains on the
  contiguous share ``[r·m : (r+1)·m]`` of it.
* **Losses** are sums over a process's tokens divided by the token count of the whole global
  mini-batch, times P: DDP (and FSDP, DeepSpeed) average gradients over the P processes, so the
  averaged gradient is that of the mean over the global mini-batch, as on one process.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import accelerate.utils
from accelerate import Accelerator
from accelerate.utils import gather_object, parse_flag_from_env
from torch import Tensor, nn

# Accelerate's probes for devices on which it forms a process group by itself. Looked up by name:
# older releases lack some (Accelerate 1.1, TRL 0.11's pin, has no is_hpu_available), and a probe a
# release lacks is a device that release cannot drive.
_DEVICE_PROBES = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_hpu_available")


def _accelerator_device_available() -> bool:
    """A device for which Accelerate forms a process group by itself (CUDA, XPU, NPU, MLU, MUSA, HPU)."""
    probes = (getattr(accelerate.utils, name, None) for name in _DEVICE_PROBES)
    return torch.cuda.is_available() or any(probe() for probe in probes if probe is not None)


def cpu_process_group_needed() -> bool:
    """Whether processes must be joined over gloo on the CPU (``Accelerator(cpu=True)``).

    Accelerate 1.x joins the processes of a launch (``accelerate launch --multi_gpu``, ``torchrun``)
    only on accelerator devices, or on the CPU when ``ACCELERATE_USE_CPU`` is set: otherwise, on a
    CPU-only machine, every process silently runs alone as a world of one. True when
    ``ACCELERATE_USE_CPU`` is set, or when a launcher started several processes (``WORLD_SIZE`` > 1)
    on a machine without an accelerator device.
    """
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _accelerator_device_available()


def _on_cpu(tensors: list[Tensor]) -> list[Tensor]:
    return [t.detach().cpu() for t in tensors]


def gather_samples(
    queries: list[Tensor],
    responses: list[Tensor],
    response_masks: Optional[list[Tensor]],
) -> tuple[list[Tensor], list[Tensor], Optional[list[Tensor]]]:
    """The token ids (and optional response masks) of the global batch, on the CPU, in rank order.

    One ``all_gather_object`` of CPU tensors (so no rank unpickles another rank's device). Raises
    ValueError on every process alike if only some processes passed ``response_masks``.
    """
    local = (_on_cpu(queries), _on_cpu(responses), _on_cpu(response_masks) if response_masks is not None else None)
    per_rank = gather_object([local])
    with_masks = [masks is not None for _, _, masks in per_rank]
    if any(with_masks) and not all(with_masks):
        raise ValueError(
            "response_masks was passed on some processes but not on others "
            f"(processes {[i for i, m in enumerate(with_masks) if m]} passed it); pass it on all or none."
        )
    all_queries = [q for rank_queries, _, _ in per_rank for q in rank_queries]
    all_responses = [r for _, rank_responses, _ in per_rank for r in rank_responses]
    all_masks = [m for _, _, rank_masks in per_rank for m in rank_masks] if all(with_masks) else None
    return all_queries, all_responses, all_masks


def gather_rows(accelerator: Accelerator, tensor: Tensor, width: int) -> Tensor:
    """This process's response-aligned rows [b, t] padded with zeros to ``width`` (the global batch's
    longest response) and gathered in rank order: -> [P·b, width]."""
    return accelerator.gather(nn.functional.pad(tensor, (0, width - tensor.shape[1])).contiguous())


def own_share(rows: Tensor, process_index: int, num_processes: int) -> Tensor:
    """Rank ``process_index``'s contiguous share of ``rows`` (a global mini-batch): [M] -> [M / P]."""
    size = rows.shape[0] // num_processes
    return rows[process_index * size : (process_index + 1) * size]


def sum_across_processes(accelerator: Accelerator, value: Tensor) -> Tensor:
    """``value`` summed over the processes (itself on one process)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value, reduction="sum")


def sum_shares(accelerator: Accelerator, rows: list[tuple[Tensor, ...]], share_columns: list[int]) -> list[Tensor]:
    """Add up the processes' shares of the columns ``share_columns`` of a table of 0-d tensors (one row
    per mini-batch; the other columns are already global): one collective per step. Returns the rows
    as 1-D float tensors."""
    table = torch.stack([torch.stack([t.float() for t in row]) for row in rows])
    table[:, share_columns] = accelerator.reduce(table[:, share_columns].contiguous(), reduction="sum")
    return list(table.unbind())
