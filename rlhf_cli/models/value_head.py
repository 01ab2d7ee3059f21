"""Language models with a scalar value head: the policy and critic that PPO trains together.

:class:`AutoModelForCausalLMWithValueHead` and :class:`AutoModelForSeq2SeqLMWithValueHead` wrap a
Hugging Face language model and add :class:`ValueHead`, a dropout + linear map from the last hidden
state to one value per token. ``save_pretrained`` writes the language model as a plain Hugging Face
directory (``AutoModelForCausalLM.from_pretrained`` loads it) plus ``value_head.safetensors``;
``from_pretrained`` reads that layout and TRL's, where the ``v_head.summary.*`` tensors sit inside the
model's own weight files.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel

from rlhf_cli.errors import ModelLoadError
from rlhf_cli.hub import hub_failure_message
from rlhf_cli.models.logit_positions import logits_at
from rlhf_cli.models.model_facts import (  # noqa: F401 (check_model_source, is_seq2seq_config: also imported from here)
    _is_peft_model,
    check_model_source,
    hidden_size_of,
    is_seq2seq_config,
    keep_positions,
)
from rlhf_cli.models.reward_adapter import load_reward_adapter, reward_scores
from rlhf_cli.models.trl_loading import (
    TRLLoadingOptions,
    adapter_config_of,
    load_trained_adapter,
    translate_legacy_kwargs,
    warn_ignored_loading_kwargs,
    with_new_adapter,
)
from rlhf_cli.models.value_head_files import VALUE_HEAD_FILE, read_value_head

# Keyword arguments of from_pretrained that configure the value head, not the language model.
_HEAD_KWARGS = ("summary_dropout_prob", "v_head_init_strategy", "v_head_initializer_range")
# Keyword arguments of from_pretrained that also say where to find the value head file.
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


class ValueHead(nn.Module):
    """Dropout then ``Linear(hidden_size, 1)``: one scalar value per position of the last hidden state."""

    def __init__(self, config: PretrainedConfig, summary_dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(summary_dropout_prob)
        # Float32 whatever the language model's dtype: values are regressed onto returns and clipped to
        # +-cliprange_value around the old values, and bfloat16 keeps only 2-3 significant digits.
        self.summary = nn.Linear(hidden_size_of(config), 1, dtype=torch.float32)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Hidden states [B, L, H] in any float dtype -> values [B, L] float32."""
        # Autocast would run the matmul in half precision again; the head is tiny, so keep it exact.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            hidden = hidden_states.to(self.summary.weight.dtype)
            values = self.summary(self.dropout(hidden)).squeeze(-1)
        return values.to(torch.float32)


def init_value_head(head: ValueHead, strategy: str | None, initializer_range: float) -> None:
    """Re-initialise ``head``: None keeps ``nn.Linear``'s default init; "normal" draws the weight from
    N(0, initializer_range^2) and zeroes the bias."""
    if strategy is None:
        return
    if strategy != "normal":
        raise ValueError(f"v_head_init_strategy must be None or 'normal', got {strategy!r}.")
    with torch.no_grad():
        head.summary.weight.normal_(mean=0.0, std=initializer_range)
        head.summary.bias.zero_()


class PreTrainedModelWrapper(nn.Module):
    """A Hugging Face language model (``pretrained_model``) plus a value head (``v_head``).

    Subclasses fix which transformers auto class loads the model and how ``forward`` reads the last
    hidden state. ``config`` is the language model's config.
    """

    transformers_parent_class: type = AutoModelForCausalLM
    is_encoder_decoder: bool = False
    # Attribute or module names of a language-model head (TRL's names): wrapping a model without one
    # (a bare GPT2Model) is an error, since PPO needs next-token logits.
    lm_head_namings: tuple[str, ...] = ("lm_head", "embed_out")
    # The from_pretrained keywords that configure the value head rather than the language model.
    supported_args: tuple[str, ...] = _HEAD_KWARGS

    def __init__(
        self,
        pretrained_model: nn.Module,
        *,
        summary_dropout_prob: float | None = None,
        v_head_init_strategy: str | None = None,
        v_head_initializer_range: float = 0.2,
    ) -> None:
        """``summary_dropout_prob`` None takes the wrapped config's ``summary_dropout_prob`` if it has
        one (as in TRL), else 0.1."""
        super().__init__()
        if is_seq2seq_config(pretrained_model.config) != self.is_encoder_decoder:
            kind, wanted, config_kind = (
                ("a decoder-only", "AutoModelForCausalLMWithValueHead", "causal")
                if self.is_encoder_decoder
                else ("an encoder-decoder", "AutoModelForSeq2SeqLMWithValueHead", "seq2seq")
            )
            raise ValueError(
                f"{type(self).__name__} cannot wrap {type(pretrained_model).__name__}, which is {kind} model; "
                f"use {wanted} (model.kind={config_kind})."
            )
        self._check_lm_head(pretrained_model)
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.is_peft_model = _is_peft_model(pretrained_model)
        # TRL's reward-adapter attributes; from_pretrained(..., reward_adapter=...) sets them and ``score``.
        self.supports_rm_adapter = False
        self.rm_adapter_name: str | None = None
        if summary_dropout_prob is None:
            summary_dropout_prob = getattr(self.config, "summary_dropout_prob", None)
        self.v_head = ValueHead(self.config, 0.1 if summary_dropout_prob is None else summary_dropout_prob)
        init_value_head(self.v_head, v_head_init_strategy, v_head_initializer_range)
        # Beside the language model's (first) parameters, so a model loaded onto a GPU runs as is.
        self.v_head.to(next(pretrained_model.parameters()).device)

    @classmethod
    def _check_lm_head(cls, pretrained_model: nn.Module) -> None:
        """ValueError unless ``pretrained_model`` has a language-model head (``lm_head_namings`` or
        transformers' output embeddings)."""
        names = {name.rsplit(".", 1)[-1] for name, _ in pretrained_model.named_modules()}
        if names & set(cls.lm_head_namings):
            return
        get_output = getattr(pretrained_model, "get_output_embeddings", None)
        if callable(get_output) and get_output() is not None:
            return
        raise ValueError(
            f"{cls.__name__} cannot wrap {type(pretrained_model).__name__}: it has no language-model head "
            f"(no module named {' or '.join(cls.lm_head_namings)}, no output embeddings), so it gives no "
            f"next-token logits to train. Load the model with its LM head, e.g. "
            f"{cls.transformers_parent_class.__name__}.from_pretrained(...) instead of AutoModel."
        )

    # TRL's state-dict layout -------------------------------------------------------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Tensor]:
        """TRL's keys: the wrapped model's own keys (as in its plain transformers state dict) plus
        ``v_head.summary.weight`` and ``v_head.summary.bias``."""
        if args:
            raise TypeError("state_dict takes keyword arguments only (destination=, prefix=, keep_vars=).")
        destination = OrderedDict() if destination is None else destination
        self.pretrained_model.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self.v_head.state_dict(destination=destination, prefix=f"{prefix}v_head.", keep_vars=keep_vars)
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        """Load TRL's layout (see :meth:`state_dict`); keys prefixed ``pretrained_model.`` (nn.Module's
        own layout, as older rlhf_cli checkpoints hold) load too. Missing and unexpected keys are
        reported in TRL's layout."""
        head, language = {}, {}
        for key, value in state_dict.items():
            if key.startswith("v_head."):
                head[key[len("v_head."):]] = value
            else:
                language[key[len("pretrained_model."):] if key.startswith("pretrained_model.") else key] = value
        lm_result = self.pretrained_model.load_state_dict(language, strict=False, assign=assign)
        head_result = self.v_head.load_state_dict(head, strict=False, assign=assign)
        missing = [*lm_result.missing_keys, *(f"v_head.{key}" for key in head_result.missing_keys)]
        unexpected = [*lm_result.unexpected_keys, *(f"v_head.{key}" for key in head_result.unexpected_keys)]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}."
            )
        return _IncompatibleKeys(missing, unexpected)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> "PreTrainedModelWrapper":
        """Load (or wrap) a language model and attach its saved value head, or a fresh one.

        ``pretrained_model_name_or_path`` is a Hub id or local directory (str or Path), or an already
        built ``PreTrainedModel`` / peft ``PeftModel`` (loading arguments are then ignored, as in TRL).
        ``summary_dropout_prob``, ``v_head_init_strategy`` and ``v_head_initializer_range`` configure
        the head; TRL's ``peft_config``, ``is_trainable``, ``reward_adapter`` and ``reward_adapter_name``
        are read by :mod:`rlhf_cli.models.trl_loading`; every other argument goes to the transformers
        auto class's ``from_pretrained`` (``torch_dtype``, ``trust_remote_code``, ``revision``...).
        """
        head_kwargs = {key: kwargs.pop(key) for key in _HEAD_KWARGS if key in kwargs}
        options = TRLLoadingOptions.pop_from(kwargs)
        source = pretrained_model_name_or_path
        head_state = None
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
            translate_legacy_kwargs(kwargs)
            language_model = cls._load_language_model(name, model_args, kwargs, options)
            head_state = read_value_head(name, **{key: kwargs[key] for key in _HUB_KWARGS if key in kwargs})
        elif isinstance(source, PreTrainedModel) or _is_peft_model(source):
            warn_ignored_loading_kwargs(source, model_args, kwargs)
            language_model = source
        else:
            raise TypeError(
                f"pretrained_model_name_or_path must be a Hub id, a local path or a transformers PreTrainedModel, "
                f"got {type(source).__name__}."
            )
        language_model = with_new_adapter(language_model, options)
        score = None
        if options.reward_adapter is not None:
            score = load_reward_adapter(language_model, options.reward_adapter, options.reward_adapter_name, kwargs.get("token"))
        model = cls(language_model, **head_kwargs)
        if head_state is not None:
            model.v_head.load_state_dict(head_state)
        if score is not None:
            model.score, model.supports_rm_adapter, model.rm_adapter_name = score, True, options.reward_adapter_name
        return model

    @classmethod
    def _load_language_model(cls, name: str, model_args: tuple, kwargs: dict[str, Any], options: TRLLoadingOptions) -> nn.Module:
        """The language model ``name`` holds, or, when it holds a trained PEFT adapter, its base model
        with that adapter (trainable if ``options.is_trainable``)."""
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        adapter_config = adapter_config_of(name, hub_kwargs)
        base_name = adapter_config.get("base_model_name_or_path") if adapter_config is not None else name
        if not base_name:
            raise ModelLoadError(f"The PEFT adapter in '{name}' does not say which base model it adapts (base_model_name_or_path).")
        base_kwargs = kwargs if adapter_config is None else {k: v for k, v in kwargs.items() if k not in ("subfolder", "revision")}
        check_model_source(base_name, what="policy model", config_key="model.name_or_path", subfolder=base_kwargs.get("subfolder", ""))
        try:
            model = cls.transformers_parent_class.from_pretrained(base_name, *model_args, **base_kwargs)
        except OSError as err:  # missing files, unknown repo, no network
            raise ModelLoadError(hub_failure_message(base_name, what="policy model", config_key="model.name_or_path", error=err)) from err
        if adapter_config is None:
            return model
        return load_trained_adapter(name, model, is_trainable=options.is_trainable, token=kwargs.get("token"))

    def compute_reward_score(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Scores [B, L, num_labels] of the reward adapter loaded with ``reward_adapter=`` (TRL's method;
        see :func:`rlhf_cli.models.reward_adapter.reward_scores`)."""
        return reward_scores(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the language model in plain Hugging Face format and the head as ``value_head.safetensors``.

        A ``state_dict`` keyword (e.g. gathered by Accelerate from a sharded model) may hold this
        wrapper's keys (TRL's layout, or ``pretrained_model.*``, plus ``v_head.*``); it is split between
        the two files.
        """
        state_dict = kwargs.pop("state_dict", None)
        if state_dict is None:
            head_state = {f"v_head.{key}": value for key, value in self.v_head.state_dict().items()}
        else:
            head_state = {key: value for key, value in state_dict.items() if key.startswith("v_head.")}
            prefix = "pretrained_model."  # nn.Module's layout; TRL's (see state_dict) has no prefix
            kwargs["state_dict"] = {
                key[len(prefix):] if key.startswith(prefix) else key: value
                for key, value in state_dict.items()
                if not key.startswith("v_head.")
            }
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        if kwargs.get("is_main_process", True):
            if self.is_peft_model:  # peft writes only the adapter: add the base model's config.json, so
                # the directory reads as a model (AutoConfig, our source checks); loading still follows
                # adapter_config.json to the base weights.
                self.pretrained_model.get_base_model().config.save_pretrained(save_directory)
            tensors = {key: value.detach().to("cpu").contiguous() for key, value in head_state.items()}
            save_file(tensors, str(Path(save_directory) / VALUE_HEAD_FILE), metadata={"format": "pt"})

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The language model's ``generate`` (the value head plays no part in sampling)."""
        return self.pretrained_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """The language model's ``gradient_checkpointing_enable``."""
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A decoder-only language model (GPT-2, Llama, ...) with a value head on its last hidden state."""

    transformers_parent_class = AutoModelForCausalLM
    is_encoder_decoder = False

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        *,
        with_values: bool = True,
        lm_head: bool = True,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns (lm_logits [B, L, V], loss or None, values [B, L] float32).

        The logits keep the model's dtype: upcasting a [B, L, V] tensor costs memory the caller may
        not need. ``logits_to_keep`` (an int k: the last k positions; or transformers' tensor forms)
        selects positions: the LM head skips the others where the model allows it (see
        :mod:`rlhf_cli.models.logit_positions`), and the values cover the same positions. ``with_values=False`` (ours: a
        critic-free estimator, or the reference) skips the value head and the hidden states it reads:
        values are None. ``lm_head=False`` (ours: the chunked log-probabilities apply the head
        themselves; needs a tensor ``logits_to_keep``) skips the LM head and returns, in place of the
        logits, the last hidden state at the kept positions: the head's input ([B, k, H] or [N, H]).
        """
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        needs_hidden = with_values or not lm_head
        # Without the LM head: the head over no position at all (an empty index on the inputs' device).
        head_keep = logits_to_keep if lm_head else torch.zeros(0, dtype=torch.long, device=logits_to_keep.device)
        outputs = logits_at(  # feature-detects what the model's forward takes
            self.pretrained_model,
            head_keep,
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            output_hidden_states=needs_hidden,
            **kwargs,
        )
        if not needs_hidden:
            return outputs.logits, outputs.loss, None
        hidden = keep_positions(outputs.hidden_states[-1], logits_to_keep)
        first = outputs.logits if lm_head else hidden
        return first, outputs.loss, self.v_head(hidden) if with_values else None


class AutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper):
    """An encoder-decoder language model (T5, BART, ...) with a value head on the decoder's last hidden state."""

    transformers_parent_class = AutoModelForSeq2SeqLM
    is_encoder_decoder = True
    lm_head_namings = ("lm_head", "embed_out", "output_projection")

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        *,
        with_values: bool = True,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns (lm_logits [B, Ld, V], loss or None, values [B, Ld] float32) over decoder positions.

        Seq2seq heads take no ``logits_to_keep``; if given, both outputs are sliced afterwards (the
        full logits are still computed). ``with_values=False``: values are None (see the causal wrapper).
        """
        logits_to_keep = kwargs.pop("logits_to_keep", None)
        outputs = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            output_hidden_states=with_values,
            **kwargs,
        )
        logits = outputs.logits
        if logits_to_keep is not None:
            logits = keep_positions(logits, logits_to_keep)
        if not with_values:
            return logits, outputs.loss, None
        hidden = outputs.decoder_hidden_states[-1]
        if logits_to_keep is not None:
            hidden = keep_positions(hidden, logits_to_keep)
        return logits, outputs.loss, self.v_head(hidden)
