"""Writing a policy in plain Hugging Face format: ``final/`` of a run and ``rlhf export``.

The directory loads with ``AutoModelForCausalLM.from_pretrained`` (or the seq2seq auto class) and
also holds the tokenizer and ``value_head.safetensors``. A LoRA policy is merged into its base
weights first, because a bare adapter is not a model a user can load on its own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.engine.run_lock import acquire
from rlhf_cli.errors import RlhfError
from rlhf_cli.models import PreTrainedModelWrapper


def save_final(policy: PreTrainedModelWrapper, tokenizer: Any, out_dir: Path) -> None:
    """Save ``policy`` (merged if it carries a PEFT adapter) and ``tokenizer`` into ``out_dir``."""
    if policy.is_peft_model:
        merged_lm = copy.deepcopy(policy.pretrained_model).merge_and_unload()
        merged = type(policy)(merged_lm)
        merged.v_head = policy.v_head
        policy = merged
    policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def export_checkpoint(checkpoint: Path, out_dir: Path) -> Path:
    """Rebuild the model a checkpoint was made for, load its weights and save it to ``out_dir``.

    ``checkpoint`` is a ``step-N`` directory, or a run directory (its newest checkpoint).
    """
    from transformers import AutoTokenizer

    from rlhf_cli.models import load_policy_and_tokenizer

    path = ckpt.resolve_resume(str(checkpoint), Path(checkpoint), what="The checkpoint")
    if path is None:
        raise ckpt.CheckpointError(f"{checkpoint} holds no checkpoint.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RlhfError(f"{out_dir} exists and is not empty; give a new directory to export into.")
    _, cfg = ckpt.read_checkpoint(path)
    policy, tokenizer = load_policy_and_tokenizer(cfg.model, disable_dropout=bool(cfg.ppo.disable_dropout))
    ckpt.load_weights(path, policy)
    if (path / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    lock = acquire(out_dir, command="rlhf export")  # one writer: not two exports into one directory
    try:
        save_final(policy, tokenizer, out_dir)
    finally:
        lock.release()
    return path
