"""Value-head models (policy + critic), the frozen reference model, dropout control, building from config."""

from rlhf_cli.models.builder import load_policy_and_tokenizer, load_tokenizer
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.reference import create_reference_model
from rlhf_cli.models.value_head import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    ValueHead,
)

__all__ = [
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "PreTrainedModelWrapper",
    "ValueHead",
    "create_reference_model",
    "disable_dropout",
    "load_policy_and_tokenizer",
    "load_tokenizer",
]
