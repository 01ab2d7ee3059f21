"""What the engine does differently when the trainer shards with FSDP2 (``ppo.sharding=fsdp2``).

Checkpoints keep the unsharded format (``weights.safetensors`` + ``trainer.pt``, see
:mod:`rlhf_cli.engine.checkpoint`): every process gathers the full weights and optimiser state
(``rlhf_cli.ppo.sharding``), rank 0 writes them, and on resume every process reads them and keeps its
own shard. Such a checkpoint does not depend on the number of processes, and ``rlhf export`` reads
it as any other. The price: at save time each process briefly holds a full copy in CPU memory.

``final/`` and the before/after comparison need whole models on rank 0 alone (no collective can run
there), so rank 0 builds plain copies: the policy from the gathered weights, the reference afresh
from the model config (the frozen reference is the policy as it was loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from rlhf_cli.engine.checkpoint import CheckpointError
from rlhf_cli.models import PreTrainedModelWrapper, load_policy_and_tokenizer


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``weights.safetensors`` as a state dict on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(Path(path) / "weights.safetensors"))
    except SafetensorError as err:
        raise CheckpointError(f"{path}/weights.safetensors is corrupt ({err}); pick another checkpoint.") from err


def check_weights_fit(path: Path, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """CheckpointError unless the saved weights have the model's names and shapes (a tied weight may be
    saved once)."""
    own = model.state_dict()
    wrong = [k for k, v in saved.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(
            f"{path} was made for a different model: its weights do not fit this one (e.g. {', '.join(wrong[:3])}). "
            "Resume with the model config the checkpoint was made with (see its config.yaml)."
        )


def plain_policy(model_cfg: DictConfig, state: dict[str, torch.Tensor], *, disable_dropout: bool) -> PreTrainedModelWrapper:
    """An unsharded value-head policy on the CPU holding the gathered ``state``."""
    policy, _ = load_policy_and_tokenizer(model_cfg, disable_dropout=disable_dropout)
    policy.load_state_dict(state, strict=False)  # a tied weight may appear under one name only
    return policy


def plain_reference(model_cfg: DictConfig, *, disable_dropout: bool) -> PreTrainedModelWrapper:
    """The reference as the run started it: the policy freshly loaded from the model config."""
    reference, _ = load_policy_and_tokenizer(model_cfg, disable_dropout=disable_dropout)
    return reference.eval()


def models_for_finish(cfg: DictConfig, sharded_policy: torch.nn.Module, is_main: bool) -> tuple[Optional[Any], Optional[Any]]:
    """(policy, reference) as plain models on rank 0 for final/ and the comparison; (None, None) on the
    other ranks. Every process must call it (the weights are gathered collectively)."""
    from rlhf_cli.ppo.sharding import full_model_state

    state = full_model_state(sharded_policy)
    if not is_main:
        return None, None
    dropout_off = bool(cfg.ppo.disable_dropout)
    policy = plain_policy(cfg.model, state, disable_dropout=dropout_off)
    reference = plain_reference(cfg.model, disable_dropout=dropout_off) if int(cfg.eval_prompts) > 0 else None
    return policy, reference
