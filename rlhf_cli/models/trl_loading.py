"""TRL 0.11's own ``from_pretrained`` keywords for the value-head wrappers, and the transformers-4
loading keywords that TRL scripts pass.

TRL's ``AutoModelForCausalLMWithValueHead.from_pretrained`` takes out of its keyword arguments
``peft_config`` (wrap the loaded model with a new PEFT adapter), ``is_trainable`` (whether an adapter
loaded from a directory or Hub id trains), ``reward_adapter`` and ``reward_adapter_name`` (a LoRA
reward model, see :mod:`rlhf_cli.models.reward_adapter`), then hands the rest to transformers.
Scripts of that era also pass ``load_in_8bit=`` / ``load_in_4bit=``, which transformers 5 no longer
takes: they become a ``BitsAndBytesConfig`` here, or a clear refusal where 8/4-bit loading cannot run.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import cached_file

from rlhf_cli.errors import ModelLoadError
from rlhf_cli.hub import looks_like_local_path

ADAPTER_CONFIG_FILE = "adapter_config.json"
# TRL's default name for the reward adapter beside the policy's.
DEFAULT_REWARD_ADAPTER_NAME = "reward_adapter"
# peft.prepare_model_for_kbit_training's options, which TRL also takes from from_pretrained's keywords.
_KBIT_KWARGS = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs")
# Keywords meaningful only when loading by name; with an already built model TRL ignores them silently.
_QUIET_WITH_A_MODEL = ("is_trainable", "token")


@dataclass
class TRLLoadingOptions:
    """The keywords of TRL's ``from_pretrained`` that are not transformers'."""

    peft_config: Any = None
    reward_adapter: Optional[str] = None
    reward_adapter_name: str = DEFAULT_REWARD_ADAPTER_NAME
    is_trainable: bool = False
    kbit_kwargs: dict[str, Any] | None = None

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> "TRLLoadingOptions":
        """Take TRL's keywords out of ``kwargs`` (in place) and check them as TRL does."""
        options = cls(
            peft_config=kwargs.pop("peft_config", None),
            reward_adapter=kwargs.pop("reward_adapter", None),
            reward_adapter_name=kwargs.pop("reward_adapter_name", DEFAULT_REWARD_ADAPTER_NAME),
            is_trainable=bool(kwargs.pop("is_trainable", False)),
            kbit_kwargs={key: kwargs.pop(key) for key in _KBIT_KWARGS if key in kwargs},
        )
        if options.reward_adapter is not None and not isinstance(options.reward_adapter, str):
            raise ValueError(
                "reward_adapter must be a string: the local path or Hub id of a PEFT reward adapter saved with its "
                f"score head, got {type(options.reward_adapter).__name__}."
            )
        if options.peft_config is not None:
            peft = require_peft("peft_config=")
            if not isinstance(options.peft_config, peft.PeftConfig):
                raise ValueError(
                    f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig(...)), got {type(options.peft_config).__name__}."
                )
        return options


def require_peft(what: str) -> Any:
    """The ``peft`` module, or a ModelLoadError saying that ``what`` needs it."""
    if importlib.util.find_spec("peft") is None:
        raise ModelLoadError(
            f"{what} needs the 'peft' package, which is not installed. Run `pip install peft` "
            "(or `pip install 'rlhf-cli[peft]'`)."
        )
    import peft

    return peft


def warn_ignored_loading_kwargs(model: nn.Module, model_args: tuple, kwargs: dict[str, Any]) -> None:
    """TRL ignores loading arguments given with an already built model; so do we, saying so once."""
    ignored = [key for key in kwargs if key not in _QUIET_WITH_A_MODEL]
    if model_args or ignored:
        warnings.warn(
            f"from_pretrained ignores {ignored or list(model_args)} when given an already built "
            f"{type(model).__name__}: loading arguments only apply when loading from a name or path.",
            UserWarning,
            stacklevel=3,
        )


# transformers-4 loading keywords --------------------------------------------------------------------
def translate_legacy_kwargs(kwargs: dict[str, Any]) -> None:
    """Rewrite, in place, the loading keywords transformers 5 no longer takes.

    ``load_in_8bit`` / ``load_in_4bit``: False is dropped; True becomes a ``BitsAndBytesConfig`` (with
    ``device_map`` set to this process's GPU when absent, as TRL does) where bitsandbytes and a CUDA
    GPU are available, else a ModelLoadError naming the fix. A ``device_map`` that places weights on
    a GPU this machine lacks is refused the same way.
    """
    in_8bit, in_4bit = bool(kwargs.pop("load_in_8bit", False)), bool(kwargs.pop("load_in_4bit", False))
    if in_8bit or in_4bit:
        kwargs["quantization_config"] = _bitsandbytes_config(in_8bit, in_4bit, kwargs.get("quantization_config"))
        kwargs.setdefault("device_map", {"": _local_gpu_index()})
    _check_device_map(kwargs.get("device_map"))


def _bitsandbytes_config(in_8bit: bool, in_4bit: bool, given: Any) -> Any:
    flag = "load_in_8bit=True" if in_8bit else "load_in_4bit=True"
    if in_8bit and in_4bit:
        raise ModelLoadError("load_in_8bit=True and load_in_4bit=True were both given; choose one of them.")
    if given is not None:
        raise ModelLoadError(f"{flag} and quantization_config= were both given; pass only quantization_config.")
    missing = [
        reason
        for reason, absent in (
            ("the 'bitsandbytes' package is not installed", importlib.util.find_spec("bitsandbytes") is None),
            ("torch sees no CUDA GPU", not torch.cuda.is_available()),
        )
        if absent
    ]
    if missing:
        raise ModelLoadError(
            f"{flag} loads the model quantised by bitsandbytes, which needs a CUDA GPU and the bitsandbytes "
            f"package, but {' and '.join(missing)}. Remove {flag} to load the model in full precision "
            "(e.g. torch_dtype=torch.bfloat16 halves its memory), or run on a CUDA machine with `pip install bitsandbytes`."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=in_8bit, load_in_4bit=in_4bit)


def _local_gpu_index() -> int:
    """This process's GPU (Accelerate's local process index), where TRL puts a quantised model."""
    from accelerate import PartialState

    return PartialState().local_process_index


def _check_device_map(device_map: Any) -> None:
    """Refuse a ``device_map`` naming a GPU (an index or "cuda...") when torch sees none."""
    if device_map is None or torch.cuda.is_available():
        return
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    gpu_places = [
        place
        for place in places
        if (isinstance(place, int) and not isinstance(place, bool))
        or (isinstance(place, (str, torch.device)) and str(place).startswith("cuda"))
    ]
    if gpu_places:
        raise ModelLoadError(
            f"device_map={device_map!r} places the model on GPU {gpu_places[0]!r}, but torch sees no CUDA GPU here. "
            "Leave device_map out (the PPOTrainer moves the model to its device), or pass device_map='cpu'."
        )


# PEFT -----------------------------------------------------------------------------------------------
def adapter_config_of(name: str, hub_kwargs: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The parsed ``adapter_config.json`` of a directory or Hub id holding a trained PEFT adapter, or
    None (no such file, or peft not installed: then the name loads as a plain model, as in TRL)."""
    if importlib.util.find_spec("peft") is None:
        return None
    if looks_like_local_path(name):
        local = Path(name).expanduser() / hub_kwargs.get("subfolder", "") / ADAPTER_CONFIG_FILE
        return json.loads(local.read_text()) if local.is_file() else None
    try:
        path = cached_file(
            name,
            ADAPTER_CONFIG_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except (OSError, ValueError):  # not a valid repo id: the model load that follows says what is wrong
        return None
    return json.loads(Path(path).read_text()) if path is not None else None


def load_trained_adapter(name: str, base: nn.Module, *, is_trainable: bool, token: Any) -> nn.Module:
    """``base`` with the trained adapter of ``name`` (a ``peft.PeftModel``); trainable only when
    ``is_trainable``, as in TRL and peft."""
    peft = require_peft(f"The adapter in '{name}'")
    return peft.PeftModel.from_pretrained(base, name, is_trainable=is_trainable, token=token)


def with_new_adapter(model: nn.Module, options: TRLLoadingOptions) -> nn.Module:
    """``model`` wrapped with a new adapter from ``options.peft_config`` (prepared for k-bit training
    first when it was loaded quantised), or unchanged when there is no config or it already has one."""
    if options.peft_config is None:
        return model
    peft = require_peft("peft_config=")
    if isinstance(model, peft.PeftModel):
        return model
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(model, **(options.kbit_kwargs or {}))
    return peft.get_peft_model(model, options.peft_config)
