"""TRL 0.11's reward adapter: one base model serving policy, reference and reward.

``from_pretrained(..., reward_adapter=ID)`` loads a LoRA reward model (a PEFT adapter trained for
sequence classification, saved with its ``score`` head) beside the policy's adapter on the same
base model; :func:`reward_scores` (the wrapper's ``compute_reward_score``) switches to it for one
no-gradient pass and reads the score head on the last hidden states. The reward adapter and its head
never train.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.utils import cached_file

from rlhf_cli.errors import ModelLoadError
from rlhf_cli.hub import looks_like_local_path

# Adapter weight files, in the order they are looked for.
_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# The head's module name in a sequence-classification model (GPT-2, Llama, ...), as TRL reads it.
_SCORE_MODULE = "score"


def load_reward_adapter(peft_model: nn.Module, adapter_id: str, adapter_name: str, token: Any = None) -> nn.Linear:
    """Load the reward adapter ``adapter_id`` into ``peft_model`` as ``adapter_name`` (frozen; the
    active adapter stays the policy's) and return its score head as a frozen ``nn.Linear``."""
    from rlhf_cli.models.trl_loading import require_peft

    if not isinstance(peft_model, require_peft("reward_adapter=").PeftModel):
        raise ValueError(
            "reward_adapter= needs a PEFT policy: pass peft_config=LoraConfig(...) too, or a peft.PeftModel, "
            "so that policy and reward are two adapters on one base model."
        )
    peft_model.load_adapter(adapter_id, adapter_name, is_trainable=False)
    head_state = _score_tensors(_adapter_weights(adapter_id, token), adapter_id)
    num_labels, hidden_size = head_state["weight"].shape
    reference = next(peft_model.parameters())
    score = nn.Linear(hidden_size, num_labels, bias="bias" in head_state, device=reference.device, dtype=reference.dtype)
    score.load_state_dict(head_state)
    score.requires_grad_(False)
    return score


def _adapter_weights(adapter_id: str, token: Any) -> dict[str, Tensor]:
    for filename in _ADAPTER_WEIGHT_FILES:
        local = Path(adapter_id).expanduser() / filename
        path: Optional[str] = str(local) if local.is_file() else None
        if path is None and not looks_like_local_path(adapter_id):
            path = cached_file(
                adapter_id,
                filename,
                token=token,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        if path is not None:
            if filename.endswith(".safetensors"):
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    raise ModelLoadError(
        f"No adapter weights ({' or '.join(_ADAPTER_WEIGHT_FILES)}) found for the reward adapter '{adapter_id}'. "
        "Point reward_adapter= at a directory or Hub id written by a PEFT model's save_pretrained."
    )


def _score_tensors(state: dict[str, Tensor], adapter_id: str) -> dict[str, Tensor]:
    """The score head's ``weight`` (and ``bias``) among the adapter's tensors."""
    head = {
        key.rsplit(".", 1)[-1]: value
        for key, value in state.items()
        if f"{_SCORE_MODULE}." in key and key.rsplit(".", 1)[-1] in ("weight", "bias")
    }
    if "weight" not in head:
        raise ModelLoadError(
            f"The reward adapter '{adapter_id}' holds no score head (no '{_SCORE_MODULE}.weight' tensor). Save it "
            "from a sequence-classification PEFT model (task_type='SEQ_CLS'), whose score head PEFT saves with "
            "the adapter."
        )
    return head


@contextlib.contextmanager
def _adapter_active(peft_model: nn.Module, adapter_name: str) -> Iterator[None]:
    """``adapter_name`` active, in eval mode, for the block; then the previous adapter, mode and
    trainable flags (peft's set_adapter marks the adapter it activates trainable)."""
    previous = peft_model.active_adapter
    was_training = peft_model.training
    trainable = {name: p.requires_grad for name, p in peft_model.named_parameters()}
    peft_model.set_adapter(adapter_name)
    peft_model.eval()
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        peft_model.train(was_training)
        for name, parameter in peft_model.named_parameters():
            parameter.requires_grad_(trainable[name])


def reward_scores(wrapper: Any, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
    """The reward adapter's scores [B, L, num_labels] at every position (TRL's ``compute_reward_score``;
    a sequence's score is usually read at its last token), without gradients."""
    if not getattr(wrapper, "supports_rm_adapter", False):
        raise ValueError(
            "This model has no reward adapter: load it with from_pretrained(..., reward_adapter=PATH_OR_HUB_ID) "
            "to score with compute_reward_score."
        )
    peft_model = wrapper.pretrained_model
    with torch.no_grad(), _adapter_active(peft_model, wrapper.rm_adapter_name):
        outputs = peft_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True, **kwargs
        )
        hidden = outputs.hidden_states[-1]
        return wrapper.score(hidden.to(wrapper.score.weight.dtype))
