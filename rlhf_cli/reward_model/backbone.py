"""The backbone of a reward model: a causal LM with a scalar value head, or a sequence classifier.

Which one is read from the checkpoint the ``model`` group names, so ``model=local
model.name_or_path=DIR`` needs no extra key: a checkpoint whose ``config.json`` names a
``*ForSequenceClassification`` architecture, or a masked-LM encoder (BERT, RoBERTa, DeBERTa, ...), or a
model type with a sequence-classification class and no causal LM (DistilBERT), loads as
``AutoModelForSequenceClassification`` with one label; everything else (the review GPT-2, tiny GPT-2,
causal LMs, GGUF files) is the language model with a scalar value head on its last token. The scoring
rule of each (padding side, special tokens, which score is read) is ``models.reward_scoring.HEAD_RULES``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.errors import ConfigError, ModelLoadError
from rlhf_cli.models.model_facts import dtype_kwargs
from rlhf_cli.models.reward_scoring import SEQUENCE_CLASSIFICATION, VALUE_HEAD

_ENCODER_PRETRAINING = ("ForMaskedLM", "ForPreTraining")
_COMPOSED_TANH_GELU = ("gelu_new", "gelu_fast")


@dataclass
class Backbone:
    """A reward model ready to train: the model, its tokenizer, its ``head`` kind and notices to print."""

    model: torch.nn.Module
    tokenizer: Any
    head: str
    notices: list[str] = field(default_factory=list)


def is_sequence_classifier(config: Any) -> bool:
    """Whether a checkpoint's config makes it a sequence-classification reward backbone (see the module doc)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    names = list(getattr(config, "architectures", None) or [])
    if any(name.endswith("ForSequenceClassification") or name.endswith(_ENCODER_PRETRAINING) for name in names):
        return True
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _classifier_config(model_cfg: Any) -> Any:
    """The checkpoint's config if ``model_cfg`` names a sequence-classification backbone, else None."""
    if model_cfg.source != "pretrained" or not model_cfg.name_or_path or model_cfg.gguf_file:
        return None  # the causal loader owns these cases and their messages
    from transformers import AutoConfig

    from rlhf_cli.hub import hub_failure_message
    from rlhf_cli.models.model_facts import check_model_source

    name = str(model_cfg.name_or_path)
    check_model_source(name, what="reward model backbone", config_key="model.name_or_path")
    try:
        config = AutoConfig.from_pretrained(name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(hub_failure_message(name, what="reward model backbone", config_key="model.name_or_path", error=err)) from err
    return config if is_sequence_classifier(config) else None


def load_reward_backbone(model_cfg: Any, *, disable_dropout: bool = True) -> Backbone:
    """The reward model ``model_cfg`` (the ``model`` config group) describes, with its tokenizer."""
    from rlhf_cli.models import load_policy_and_tokenizer, load_tokenizer

    config = _classifier_config(model_cfg)
    if config is None:
        model, tokenizer = load_policy_and_tokenizer(model_cfg, disable_dropout=disable_dropout)
        if model.is_encoder_decoder:
            raise ConfigError(
                "rlhf reward trains decoder-only (causal) or sequence-classification backbones; an encoder-decoder "
                "(model.kind=seq2seq) is not supported. Use a causal LM, or a *ForSequenceClassification checkpoint."
            )
        _for_training(model)
        return Backbone(model, tokenizer, VALUE_HEAD)
    tokenizer = load_tokenizer(model_cfg)
    model, notices = _load_classifier(model_cfg, config, tokenizer)
    _for_training(model)
    if model_cfg.lora.enabled:
        model = _with_lora(model, model_cfg)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if disable_dropout:
        from rlhf_cli.models import disable_dropout as disable_dropout_in

        disable_dropout_in(model)
    return Backbone(model, tokenizer, SEQUENCE_CLASSIFICATION, notices)


def _for_training(model: torch.nn.Module) -> None:
    """No key/value cache (a reward model scores whole texts: the cache is memory nobody reads) and the
    fused GELU."""
    fuse_tanh_gelu(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def fuse_tanh_gelu(model: torch.nn.Module) -> None:
    """Swap the tanh-approximate GELU written as Python arithmetic (``gelu_new``, ``gelu_fast``: GPT-2's,
    the review GPT-2's) for the same function as one fused op (``gelu_pytorch_tanh``), in place, and say so
    in the configs so a saved model loads with it.

    The composed form keeps about six [tokens, 4 x hidden] intermediates per MLP for the backward pass; the
    fused op keeps its input only: on the review GPT-2 at 32 texts x 20 tokens, ~60 MiB less peak memory
    per step and a faster step. The two agree to float rounding (~1e-7 relative).
    """
    from transformers import PretrainedConfig, activations
    from transformers.activations import FastGELUActivation, NewGELUActivation

    # The fused op's class: GELUTanh since transformers 4.48, PytorchGELUTanh before (4.46 is our floor).
    fused_gelu = getattr(activations, "GELUTanh", None) or activations.PytorchGELUTanh

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (NewGELUActivation, FastGELUActivation)):
                setattr(module, name, fused_gelu())
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            for key in ("activation_function", "hidden_act"):
                if getattr(config, key, None) in _COMPOSED_TANH_GELU:
                    setattr(config, key, "gelu_pytorch_tanh")


def _load_classifier(model_cfg: Any, config: Any, tokenizer: Any) -> tuple[torch.nn.Module, list[str]]:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    is_classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    notices = []
    if not is_classifier:
        notices.append(f"{model_cfg.name_or_path} is a {type(config).__name__} without a classification head; rlhf reward "
                       f"puts a fresh one-label (scalar) head on it (initialised from the run's seed).")
    elif config.num_labels != 1:
        notices.append(f"{model_cfg.name_or_path} is a classifier of {config.num_labels} labels; its head is replaced by a "
                       f"fresh one-label (scalar) head (initialised from the run's seed).")
    config.num_labels = 1
    # The decoder's pooling reads the last token that is not the pad token: the tokenizer's pad must be it.
    config.pad_token_id = tokenizer.pad_token_id
    dtype = model_cfg.dtype if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its table of new head weights: the notice above says it in a line
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_cfg.name_or_path), config=config, **dtype_kwargs(dtype), revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code, ignore_mismatched_sizes=bool(notices),
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model, notices


def _with_lora(model: torch.nn.Module, model_cfg: Any) -> torch.nn.Module:
    """``model`` with LoRA adapters (``model.lora``); PEFT's SEQ_CLS task trains the classifier head in full."""
    from rlhf_cli.models.builder import check_peft_installed

    check_peft_installed()
    import peft

    lora = model_cfg.lora
    config = peft.LoraConfig(task_type="SEQ_CLS", r=int(lora.r), lora_alpha=int(lora.alpha), lora_dropout=float(lora.dropout),
                             target_modules=list(lora.target_modules) if lora.target_modules is not None else None)
    with torch.random.fork_rng(devices=[]):  # the adapters' init: the same in every run and on every rank
        torch.manual_seed(0)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as err:
            raise ConfigError(
                f"LoRA cannot be applied to this {type(model).__name__}: {err} Set model.lora.target_modules to the "
                f"names of its linear layers (e.g. [c_attn] for GPT-2, [query, value] for BERT)."
            ) from err


def save_sequence_classifier(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Write a trained sequence-classification reward model (LoRA merged into its weights) and its tokenizer."""
    if hasattr(model, "merge_and_unload"):  # a PEFT model: a bare adapter is not a model a user can load
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
