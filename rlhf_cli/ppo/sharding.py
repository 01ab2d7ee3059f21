"""FSDP2 (``torch.distributed.fsdp.fully_shard``): policy, value head and reference sharded over the processes.

One code path for every launch: the trainer shards its models itself, before the optimiser is
built, whether the processes run on CPUs over gloo (``accelerate launch --multi_gpu ...
ppo.sharding=fsdp2``) or on GPUs over NCCL (the same command, or Accelerate's FSDP config with
``fsdp_version: 2``, which turns ``ppo.sharding`` on by itself). What Accelerate adds on GPUs is only
its optimiser wrapper and its gradient-accumulation switch; it sees an already sharded module and
leaves it as it is.

* **Units**: every transformer block (the classes the model lists in ``_no_split_modules``) is an
  FSDP unit; the value head is one of its own (float32 whatever the compute dtype); the root holds
  the rest (embeddings, final norm, the tied head). A block's parameters are gathered while it runs.
* **Precision**: ``ppo.precision=bf16`` becomes FSDP2's policy — bfloat16 parameters for compute,
  float32 gradient reduction; the sharded float32 parameters are themselves the master weights (so
  :mod:`rlhf_cli.ppo.precision`'s master-weight optimiser is not used).
* **Reference**: a frozen copy sharded the same way (no optimiser state); its forward is a
  collective like the policy's.
* **Generation**: ``unsharded_root`` (in :mod:`rlhf_cli.rollout.unwrap`, below the engine) gathers the root's own parameters for the duration of
  ``generate`` (which bypasses the root's forward); blocks gather theirs in their forward, so every
  process must run the same number of forward passes: ``synced_gpus=True``.
* **State**: :func:`full_model_state` / :func:`full_optimizer_state` gather full (unsharded) state
  dicts (each DTensor's ``full_tensor()``, keyed by name); ``load_full_*`` shard them back. Written
  in the unsharded checkpoint format, so a checkpoint does not depend on the number of processes.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from rlhf_cli.errors import ConfigError
from rlhf_cli.rollout.unwrap import is_sharded, unsharded_root  # noqa: F401 (generation's FSDP2 facts, re-exported)

# FSDP2 warns about every module output that is a view (the value head's squeeze, the logits slice):
# an in-place op on one would skip a gather. rlhf_cli's losses are out of place, and the 2-process
# equivalence tests check the gradients. Set here, at import: the engine builds the trainer inside
# warnings.catch_warnings(), which would drop a filter set while sharding.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class the language model names as indivisible (its blocks)."""
    language_model = getattr(model, "pretrained_model", model)
    names = set(getattr(language_model, "_no_split_modules", None) or ())
    blocks = [m for m in language_model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"{type(language_model).__name__} names no transformer block class (_no_split_modules), so it cannot "
            "be sharded block by block; use ppo.sharding=none (DDP) for this model."
        )
    return blocks


def mixed_precision_policy(precision: str):
    """FSDP2's policy for ``ppo.precision``: bf16 computes in bfloat16 and reduces gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def device_mesh(device: torch.device):
    """One dimension over all processes of the default process group, on ``device``'s type."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Shard a value-head model in place (blocks, value head, root) and return it.

    The root is initialised at once (FSDP2 otherwise does this at the root's first forward): the
    first forward of a rollout is a block's, inside ``generate``, and a block must never become a root.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(device)
    policy = mixed_precision_policy(precision)
    model.to(device)
    for block in reversed(transformer_blocks(model)):  # innermost first, should blocks nest
        fully_shard(block, mesh=mesh, mp_policy=policy)
    head = getattr(model, "v_head", None)
    if head is not None and any(True for _ in head.parameters()):
        fully_shard(head, mesh=mesh, mp_policy=MixedPrecisionPolicy())  # float32: see ValueHead
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model._get_fsdp_state()._lazy_init()  # noqa: SLF001 - FSDP2 has no public call for this
    # FSDP2 keeps a root's parameters gathered after its forward (backward would gather them again at
    # once). The reference never runs backward, nor do the policy's no-gradient scoring passes: without
    # this every process would hold the whole embedding of both models between steps.
    model.set_reshard_after_forward(True, recurse=False)
    return model


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> name, taken before sharding replaces the parameters."""
    return {id(p): name for name, p in model.named_parameters()}


def repoint_optimizer(optimizer: torch.optim.Optimizer, old_names: dict[int, str], model: nn.Module) -> None:
    """Make an optimiser built on the unsharded parameters hold the sharded ones (same names).

    A user-given optimiser (the library API) was built before the trainer sharded the model; it must
    not have stepped yet (no state to carry over)."""
    if optimizer.state:
        raise ValueError("The optimiser given to a sharded trainer has already stepped; pass a fresh one.")
    new = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [new[old_names[id(p)]] if id(p) in old_names else p for p in group["params"]]


def _full(value: Any) -> Any:
    """A DTensor gathered whole on the CPU (a collective); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor().detach().cpu() if isinstance(value, DTensor) else value


def _like(full: torch.Tensor, target: Any) -> Any:
    """``full`` sharded as ``target`` (a DTensor parameter or state) is; as a plain tensor otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered, unsharded state dict in the model's own layout (``model.state_dict()``'s keys, so a
    value-head model's are TRL's), on the CPU of every process (a collective: every process calls it).
    A tied weight (GPT-2's head is its embedding) appears once, under its first name, as
    ``safetensors.torch.save_model`` writes it."""
    state, seen = {}, set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            state[name] = _full(value).detach().cpu().clone()
    return state


@torch.no_grad()
def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard a full state dict (every process holds it) back into ``model``. A tied weight may be
    stored once (as ``safetensors.torch.save_model`` writes it): the entries present are copied."""
    own = model.state_dict()
    for name, full in state.items():
        if name in own:
            own[name].copy_(_like(full, own[name]))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state gathered whole and keyed by parameter name (a collective), with its groups'
    hyper-parameters: independent of the number of processes and of the order of parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    state = {names[id(p)]: {k: _full(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore :func:`full_optimizer_state`'s result into ``optimizer``, each state sharded as its parameter."""
    params = dict(model.named_parameters())
    index = {name: i for i, name in enumerate(n for g in saved["param_groups"] for n in g["params"])}
    state = {index[name]: {k: _like(v, params[name]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
             for name, s in saved["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def sharding_wanted(config: Any, accelerator: Any) -> bool:
    """Whether the trainer shards with FSDP2: ``PPOConfig.sharding="fsdp2"``, or a launch with
    Accelerate's FSDP config at ``fsdp_version: 2``."""
    return getattr(config, "sharding", "none") == "fsdp2" or bool(getattr(accelerator, "is_fsdp2", False))


def _ensure_process_group(device: torch.device) -> None:
    """A world of one when no launcher formed a process group: FSDP2 needs one even alone (a
    single-process sharded run is the GPU check and a debugging aid)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_for_training(
    model: nn.Module,
    ref_model: Optional[nn.Module],
    optimizer: Optional[torch.optim.Optimizer],
    build_optimizer: Any,
    *,
    device: torch.device,
    precision: str,
) -> torch.optim.Optimizer:
    """Shard policy (with value head) and reference, and return the optimiser over the sharded
    parameters: ``build_optimizer(model)`` when none was given, else the given one repointed."""
    _ensure_process_group(device)
    old_names = parameter_names(model)
    shard_model(model, device, precision)
    if ref_model is not None:
        shard_model(ref_model, device, precision)
    if optimizer is None:
        return build_optimizer(model)
    repoint_optimizer(optimizer, old_names, model)
    return optimizer
