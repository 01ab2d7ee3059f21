"""The frozen reference model that the KL penalty compares the policy with.

By default it is a full copy of the policy. With ``num_shared_layers=k`` the embeddings and the first
k transformer layers are the very same ``Parameter`` objects in policy and reference, frozen in both:
memory for those layers is paid once, and since they never change, the reference stays the model
the policy started from.
"""

from __future__ import annotations

import copy
import re

from torch import nn

from rlhf_cli.models.value_head import PreTrainedModelWrapper

# Where common architectures keep their transformer layers ({layer} is the layer index). Encoder-
# decoder models have two stacks; layer k of each is shared.
LAYER_PATTERNS = (
    "transformer.h.{layer}",  # GPT-2, GPT-J, BLOOM, Falcon, CodeGen
    "model.layers.{layer}",  # Llama, Mistral, Qwen, Gemma, Phi
    "model.language_model.layers.{layer}",  # composite (multimodal) models in transformers 5
    "model.decoder.layers.{layer}",  # OPT, BART/Marian decoders
    "model.encoder.layers.{layer}",  # BART/Marian encoders
    "gpt_neox.layers.{layer}",  # GPT-NeoX, Pythia
    "transformer.blocks.{layer}",  # MPT
    "transformer.layers.{layer}",  # ChatGLM-style, Transformer-XL
    "backbone.layers.{layer}",  # Mamba, Falcon-Mamba
    "encoder.block.{layer}",  # T5
    "decoder.block.{layer}",  # T5
)


def create_reference_model(
    model: PreTrainedModelWrapper,
    num_shared_layers: int | None = None,
    pattern: str | None = None,
) -> PreTrainedModelWrapper:
    """A frozen (``requires_grad=False``), eval-mode copy of the value-head ``model``.

    ``num_shared_layers=k`` shares the embeddings (the parameters before the first layer) and layers
    0..k-1 with ``model`` instead of copying them, and freezes them in ``model`` too. Layers are found
    by the names in ``LAYER_PATTERNS`` or by ``pattern``, a format string with ``{layer}`` such as
    ``"transformer.h.{layer}"``. Everything else is copied once.
    """
    if num_shared_layers is None:
        if pattern is not None:
            raise ValueError("pattern only applies with num_shared_layers; pass num_shared_layers=k too.")
        return _frozen(copy.deepcopy(model))
    if num_shared_layers < 0:
        raise ValueError(f"num_shared_layers must be >= 0, got {num_shared_layers}.")

    shared = _shared_parameters(model.pretrained_model, num_shared_layers, pattern)
    for parameter in shared:
        parameter.requires_grad_(False)
    # deepcopy returns what the memo already maps an object to, so the shared Parameters are reused
    # as they are and only the rest of the model is copied (one pass, no throw-away full copy).
    reference = copy.deepcopy(model, memo={id(parameter): parameter for parameter in shared})
    return _frozen(reference)


def _frozen(model: PreTrainedModelWrapper) -> PreTrainedModelWrapper:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _shared_parameters(language_model: nn.Module, num_shared_layers: int, pattern: str | None) -> list[nn.Parameter]:
    """The embeddings (parameters listed before the first layer) and the parameters of layers < k."""
    named = list(language_model.named_parameters())
    matchers = _layer_matchers(named, pattern)
    layer_of = [_layer_index(name, matchers) for name, _ in named]
    num_layers = 1 + max(index for index in layer_of if index is not None)
    if num_shared_layers > num_layers:
        raise ValueError(f"num_shared_layers={num_shared_layers} exceeds the model's {num_layers} layers.")
    first_layer = next(position for position, index in enumerate(layer_of) if index is not None)
    return [
        parameter
        for position, ((_, parameter), index) in enumerate(zip(named, layer_of))
        if (index is None and position < first_layer) or (index is not None and index < num_shared_layers)
    ]


def _compile(layer_pattern: str) -> re.Pattern[str]:
    """``"transformer.h.{layer}"`` -> a regex matching that dotted path anywhere in a parameter name.

    Matching anywhere (after a dot) covers wrappers that prefix names, e.g. peft's ``base_model.model.``.
    """
    before, after = layer_pattern.split("{layer}", 1)
    return re.compile(r"(?:^|\.)" + re.escape(before) + r"(\d+)" + re.escape(after) + r"\.")


def _layer_matchers(named: list[tuple[str, nn.Parameter]], pattern: str | None) -> list[re.Pattern[str]]:
    """Regexes of the layer patterns this model's parameter names use (the user's, or the known ones)."""
    if pattern is not None and "{layer}" not in pattern:
        raise ValueError(f"pattern must contain '{{layer}}' where the layer index goes, got {pattern!r}.")
    candidates = [pattern] if pattern is not None else list(LAYER_PATTERNS)
    matchers = [_compile(candidate) for candidate in candidates]
    used = [matcher for matcher in matchers if any(matcher.search(name) for name, _ in named)]
    if not used:
        examples = ", ".join(name for name, _ in named[:6])
        tried = f"the pattern {pattern!r}" if pattern is not None else "any known layer pattern"
        raise ValueError(
            f"The transformer layer names of this model were not recognised: no parameter name matches "
            f"{tried}. Parameter names look like: {examples}. Pass pattern=\"...{{layer}}...\" to "
            f"create_reference_model, e.g. pattern=\"transformer.h.{{layer}}\" for names like transformer.h.0.attn.weight."
        )
    return used


def _layer_index(name: str, matchers: list[re.Pattern[str]]) -> int | None:
    for matcher in matchers:
        found = matcher.search(name)
        if found is not None:
            return int(found.group(1))
    return None
