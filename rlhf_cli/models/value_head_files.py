"""Where a saved value head lives, and reading it: ``value_head.safetensors`` beside a model rlhf_cli
saved, or TRL's layout, the ``v_head.summary.*`` tensors inside the model's own weight files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from transformers.utils import cached_file

from rlhf_cli.errors import ModelLoadError

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_WEIGHT = "v_head.summary.weight"
VALUE_HEAD_BIAS = "v_head.summary.bias"
_VALUE_HEAD_KEYS = (VALUE_HEAD_WEIGHT, VALUE_HEAD_BIAS)
# TRL-format checkpoints keep the value head inside the model's weight files; searched in this order
# (transformers prefers safetensors, so that is the file whose tensors were loaded).
_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_value_head(name: str, **hub_kwargs: Any) -> dict[str, Tensor] | None:
    """The value head saved with model ``name`` as a ``ValueHead`` state dict, or None if it has none.

    Looks for ``value_head.safetensors`` first, then for ``v_head.summary.*`` tensors inside the model's
    weight files (TRL's layout; sharded or not, safetensors or ``.bin``). ``hub_kwargs`` (revision,
    cache_dir, token, ...) locate files of a Hub id.
    """

    def locate(filename: str) -> str | None:
        # Offline, a file missing from the cache counts as absent: the model itself did load from it.
        return cached_file(
            name,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )

    head_file = locate(VALUE_HEAD_FILE)
    if head_file is not None:
        found = _read_tensors(head_file, _VALUE_HEAD_KEYS)
        return _as_head_state(found, head_file, required=True)
    # TRL's layouts: the head inside the (sharded) model weights, or, for a PEFT adapter saved by TRL,
    # alone in a pytorch_model.bin beside the adapter. The first file that holds it wins.
    for index_name in _WEIGHT_INDEX_FILES:
        index_file = locate(index_name)
        if index_file is None:
            continue
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        found = {}
        for shard in sorted({weight_map[key] for key in _VALUE_HEAD_KEYS if key in weight_map}):
            shard_file = locate(shard)
            if shard_file is None:
                raise ModelLoadError(f"The weight index {index_file} names the shard '{shard}', which is missing.")
            found.update(_read_tensors(shard_file, _VALUE_HEAD_KEYS))
        head_state = _as_head_state(found, index_file, required=False)
        if head_state is not None:
            return head_state
    for weights_name in _WEIGHT_FILES:
        weights_file = locate(weights_name)
        if weights_file is not None:
            head_state = _as_head_state(_read_tensors(weights_file, _VALUE_HEAD_KEYS), weights_file, required=False)
            if head_state is not None:
                return head_state
    return None


def _read_tensors(path: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Those of ``keys`` present in a safetensors or torch weight file (``.bin`` via weights_only loading)."""
    if path.endswith(".safetensors"):
        # Reads only the header and the requested tensors, not the whole model.
        with safe_open(path, framework="pt") as weights:
            return {key: weights.get_tensor(key) for key in keys if key in weights.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: state[key] for key in keys if key in state}


def _as_head_state(found: dict[str, Tensor], source: str, *, required: bool) -> dict[str, Tensor] | None:
    if not found and not required:
        return None
    missing = [key for key in _VALUE_HEAD_KEYS if key not in found]
    if missing:
        raise ModelLoadError(
            f"The value head in {source} is incomplete: {', '.join(missing)} is missing. Re-save the model "
            f"with save_pretrained, or delete the value head tensors to start from a fresh head."
        )
    return {"summary.weight": found[VALUE_HEAD_WEIGHT], "summary.bias": found[VALUE_HEAD_BIAS]}
