"""The policy as a module whose ``generate`` works, whatever Accelerate wrapped it in.

What is supported (generation = ``unwrapped.generate``, a loop of forward passes):

* one process, DDP (``MULTI_GPU``, ``MULTI_CPU``, ...), DeepSpeed ZeRO-1/2: every process holds
  all the weights; the unwrapped model generates as is. DDP on CPU is what the test suite runs.
* DeepSpeed ZeRO-3: parameters are partitioned and DeepSpeed's hooks all-gather each layer's
  parameters as its forward runs. Every forward pass is then a collective, so all processes must run
  the same number of them: generation passes ``synced_gpus=True`` (:func:`synced_generation_kwargs`),
  and a process whose samples are finished keeps stepping until all are. The whole model is not
  gathered up front (that would put a full copy on every device and needs DeepSpeed's hooks suspended
  through its internals). The reference must be the policy with its LoRA adapter disabled: the
  trainer refuses a separate reference model under ZeRO-3.
* FSDP (``fsdp_version: 1``): the root module's own parameters (embeddings, head: what no nested
  FSDP unit owns) are gathered with ``FullyShardedDataParallel.summon_full_params(recurse=False)``
  for the duration of generation; nested units (transformer blocks) gather theirs in their forward,
  a collective, so generation is synchronised as under ZeRO-3.
* FSDP2 (``fsdp_version: 2``, ``fully_shard``): refused with a ConfigError — its parameters are
  DTensors that only the root's forward hooks gather, and ``generate`` bypasses the root forward.

ZeRO-3 and FSDP are not exercised by the test suite (it runs on CPU without DeepSpeed).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from rlhf_cli.errors import ConfigError


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """The DeepSpeed ZeRO stage of this launch, or None when DeepSpeed is not used."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _sharded_parameters(accelerator: Accelerator) -> bool:
    """Whether no single process holds all the weights (FSDP, DeepSpeed ZeRO-3)."""
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def synced_generation_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    """Extra ``generate`` keyword arguments: ``synced_gpus=True`` when parameters are sharded."""
    return {"synced_gpus": True} if _sharded_parameters(accelerator) and accelerator.num_processes > 1 else {}


@contextlib.contextmanager
def generation_model(accelerator: Accelerator, model: nn.Module) -> Iterator[nn.Module]:
    """The prepared ``model`` unwrapped for ``generate`` (see the module docstring for what each
    distributed type needs). Pass :func:`synced_generation_kwargs` to ``generate`` as well."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.is_fsdp2:
            raise ConfigError(
                "Generation under FSDP2 (fsdp_version: 2) is not supported: generate() bypasses the root "
                "module's forward, which is what gathers FSDP2's sharded parameters. Launch with "
                "fsdp_version: 1 (configs/accelerate/fsdp.yaml) or with DeepSpeed ZeRO-2/3."
            )
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield accelerator.unwrap_model(model)
        return
    yield accelerator.unwrap_model(model)
