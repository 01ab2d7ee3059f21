"""The shipped review GPT-2 (the offline default's policy) and a reward model saved by ``rlhf reward`` load
with every supported transformers release: CI runs tests/unit with the floor releases too (transformers
4.46), where the tokenizer class name transformers 5 writes (``TokenizersBackend``) does not exist and
``from_pretrained`` takes ``torch_dtype`` instead of ``dtype``."""

from __future__ import annotations

import json

import torch

from rlhf_cli.assets import review_gpt2_dir
from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.models import load_policy_and_tokenizer
from rlhf_cli.models.model_facts import dtype_kwargs


def test_the_offline_default_policy_and_tokenizer_load(tmp_path):
    cfg = compose_train_config([f"output_dir={tmp_path}"])
    policy, tokenizer = load_policy_and_tokenizer(cfg.model)
    assert tokenizer("The movie was")["input_ids"] == [263, 359, 335]
    assert next(policy.pretrained_model.parameters()).dtype == torch.float32


def test_the_shipped_tokenizer_names_a_class_every_release_has():
    config = json.loads((review_gpt2_dir() / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_the_dtype_keyword_is_the_one_this_transformers_takes():
    import transformers
    from packaging.version import Version

    (key,) = dtype_kwargs(torch.float32)
    assert key == ("dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype")
