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
* FSDP2 (``ppo.sharding=fsdp2`` or Accelerate's ``fsdp_version: 2``; :mod:`rlhf_cli.ppo.sharding`):
  the root's own parameters (embeddings, head: what no block owns) are gathered for the duration
  of generation (``generate`` bypasses the root forward, which would gather them); blocks gather
  theirs in their forward, a collective, so generation is synchronised as under ZeRO-3. The
  2-process CPU tests run this.
* FSDP version 1: refused at launch (``engine.components.check_launch``), pointing to FSDP2.

ZeRO-3 is not exercised by the test suite (it runs on CPU without DeepSpeed) and ``rlhf train``
refuses it at launch; this module's support is for library users.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from rlhf_cli.errors import ConfigError


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``rlhf_cli.ppo.sharding.shard_model`` makes them). Here, below
    the engine, because generation asks it too."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[nn.Module]:
    """An FSDP2 ``model`` with its root's own parameters gathered (embeddings, head), for ``generate``."""
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """The DeepSpeed ZeRO stage of this launch, or None when DeepSpeed is not used."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _sharded_parameters(accelerator: Accelerator) -> bool:
    """Whether no single process holds all the weights (FSDP, DeepSpeed ZeRO-3)."""
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def synced_generation_kwargs(accelerator: Accelerator, model: Optional[nn.Module] = None) -> dict[str, Any]:
    """Extra ``generate`` keyword arguments: ``synced_gpus=True`` when parameters are sharded
    (by the launch, or ``model`` by FSDP2)."""
    sharded = _sharded_parameters(accelerator) or (model is not None and is_sharded(model))
    return {"synced_gpus": True} if sharded and accelerator.num_processes > 1 else {}


@contextlib.contextmanager
def generation_model(accelerator: Accelerator, model: nn.Module) -> Iterator[nn.Module]:
    """The prepared ``model`` unwrapped for ``generate`` (see the module docstring for what each
    distributed type needs). Pass :func:`synced_generation_kwargs` to ``generate`` as well."""
    if is_sharded(model):
        with unsharded_root(model):
            yield model
        return
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.is_fsdp2:
            raise ConfigError(
                "An FSDP2 launch whose model the trainer did not shard itself cannot generate: generate() "
                "bypasses the root forward that gathers FSDP2's parameters. Build the model through PPOTrainer "
                "(it shards with rlhf_cli.ppo.sharding)."
            )
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield accelerator.unwrap_model(model)
        return
    yield accelerator.unwrap_model(model)
