"""Turning dropout off in a model, train mode included.

PPO compares log-probabilities of the same tokens under the same weights (old vs new policy in the
first mini-batch, policy vs reference); dropout makes them disagree by noise alone. ``model.eval()``
is not enough because the policy trains in train mode, and not every model routes its dropout
through ``nn.Dropout``: attention implementations take a float probability, read either from a
module attribute set at construction (Llama's ``attention_dropout``, T5's ``dropout``) or from the
config at forward time (GPT-Neo, GPT-J, Falcon).
"""

from __future__ import annotations

import re

from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from transformers import PretrainedConfig

# Names of float dropout probabilities on modules and configs: dropout, attention_dropout,
# attn_dropout_p, hidden_dropout_prob, dropout_rate (T5), attn_pdrop/resid_pdrop/embd_pdrop (GPT-2),
# layerdrop and drop_path_rate (stochastic depth: layers skipped at random in training).
_DROPOUT_NAME = re.compile(r"dropout|pdrop|layerdrop|drop_path|drop_rate|drop_prob", re.IGNORECASE)


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability in ``module`` (layers, float attributes, configs) to 0, in place.

    Configs are changed too, so a model saved afterwards records the dropout it was trained with (0).
    """
    seen_configs: set[int] = set()
    for submodule in module.modules():
        if isinstance(submodule, _DropoutNd):
            submodule.p = 0.0
        for name, value in vars(submodule).items():
            if isinstance(value, PretrainedConfig):
                _zero_config_dropout(value, seen_configs)
            elif _is_dropout_probability(name, value):
                setattr(submodule, name, 0.0)


def _is_dropout_probability(name: str, value: object) -> bool:
    # bool is excluded: flags such as ``token_dropout`` switch a feature, they are no probability.
    return isinstance(value, float) and not isinstance(value, bool) and _DROPOUT_NAME.search(name) is not None


def _zero_config_dropout(config: PretrainedConfig, seen: set[int]) -> None:
    """Zero the dropout fields of ``config`` and of the configs nested in it (text_config, encoder, ...)."""
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_config_dropout(value, seen)
        elif _is_dropout_probability(name, value):
            setattr(config, name, 0.0)
