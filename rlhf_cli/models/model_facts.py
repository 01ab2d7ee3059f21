"""Facts about a transformers model or config that the value-head wrappers need, and a check of a
model source: encoder-decoder or not, the hidden size, PEFT or not, the positions ``logits_to_keep``
selects, and whether a name or directory holds a loadable model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor
from transformers import PretrainedConfig

from rlhf_cli.errors import ModelLoadError
from rlhf_cli.hub import check_loadable


def dtype_kwargs(dtype: torch.dtype | str) -> dict[str, torch.dtype | str]:
    """``from_pretrained``'s keyword for the weights' dtype: ``dtype`` since transformers 4.56 (which
    warns on the old name), ``torch_dtype`` before it (transformers 4.46 is our floor)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def is_seq2seq_config(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes an encoder-decoder model (T5, BART) rather than a decoder-only one."""
    return bool(config.is_encoder_decoder)


def hidden_size_of(config: PretrainedConfig) -> int:
    """Width of the decoder's last hidden state: ``hidden_size``, GPT-2's ``n_embd`` or T5's ``d_model``.

    Composite (multimodal) configs are read through their text config.
    """
    text_config = config.get_text_config(decoder=True)
    # Configs share no common field for this width; most map ``hidden_size`` onto their own name.
    # The top-level config is the fallback: under transformers 4.46, FSMT's decoder config holds
    # only the vocabulary size.
    for source in (text_config, config):
        for name in ("hidden_size", "n_embd", "d_model"):
            size = getattr(source, name, None)
            if isinstance(size, int):
                return size
    raise ValueError(
        f"Cannot tell the hidden size of a {type(config).__name__}: it has none of the fields "
        f"hidden_size, n_embd, d_model, so the value head cannot be sized."
    )


def _peft_model_class() -> type | None:
    """peft's ``PeftModel`` if peft is installed (it is an optional dependency), else None."""
    if importlib.util.find_spec("peft") is None:
        return None
    from peft import PeftModel

    return PeftModel


def _is_peft_model(model: object) -> bool:
    peft_class = _peft_model_class()
    return peft_class is not None and isinstance(model, peft_class)


def keep_positions(tensor: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The positions of ``tensor`` [B, L, ...] that ``logits_to_keep`` selects, as transformers reads it.

    An int k keeps the last k positions (0 keeps all); a 1-D tensor holds positions shared by the batch;
    a 2-D integer tensor [B, K] holds positions per row; a 2-D bool mask [B, L] keeps its True
    positions, flattened to [N, ...].
    """
    if isinstance(logits_to_keep, int):
        return tensor[:, -logits_to_keep:] if logits_to_keep else tensor
    logits_to_keep = logits_to_keep.to(tensor.device)  # an index made on the host for a GPU tensor
    if logits_to_keep.ndim == 1:
        return tensor[:, logits_to_keep]
    if logits_to_keep.dtype == torch.bool:
        return tensor[logits_to_keep]
    index = logits_to_keep.reshape(*logits_to_keep.shape, *([1] * (tensor.ndim - 2)))
    return torch.take_along_dim(tensor, index, dim=1)


def check_model_source(name: str, *, what: str, config_key: str, subfolder: str = "") -> None:
    """Fail with one paragraph if ``name`` is neither a loadable Hub id nor a directory holding a model.

    Adds to ``rlhf_cli.hub.check_loadable`` the case of an existing directory without ``config.json``,
    which transformers reports as an unrecognised model type.
    """
    check_loadable(name, what=what, config_key=config_key)
    directory = Path(name).expanduser() / subfolder
    if directory.is_dir() and not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"The {what} directory '{directory}' holds no config.json, so it is not a model saved with "
            f"save_pretrained. Point {config_key}=... at the directory that contains config.json and the weights."
        )
