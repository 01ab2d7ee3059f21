"""The review GPT-2 shipped in rlhf_cli/assets/review_gpt2: its file, its config, its perplexity, loading it as a policy."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_cli.assets import review_gpt2_dir
from rlhf_cli.config.schema import ModelConfig
from rlhf_cli.models import load_policy_and_tokenizer
from rlhf_cli.tools import pretrain_review_lm as pretrain

HELDOUT_REVIEWS = 48  # test-split reviews (never trained on); first chunk of each, ~5,000 tokens

# Fields of config.json that record the file's provenance, not the model's shape or behaviour.
_PROVENANCE = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"}


@pytest.fixture(scope="module")
def shipped():
    """The shipped policy and its tokenizer, loaded as `model=review_gpt2` does."""
    torch.set_num_threads(1)
    return load_policy_and_tokenizer(ModelConfig(source="review_gpt2"))


def test_shipped_file_matches_the_recorded_sha256():
    """rlhf_cli/assets/review_gpt2/README.md records the sha256 of the weights it describes."""
    directory = review_gpt2_dir()
    recorded = re.search(r"model\.safetensors[^\n]*?`([0-9a-f]{64})`", (directory / "README.md").read_text())
    assert recorded, "README.md of the asset must record the sha256 of model.safetensors"
    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == recorded.group(1)
    assert (directory / "model.safetensors").stat().st_size < 20 * 2**20  # the wheel stays small


def test_shipped_config_is_what_the_script_writes(shipped):
    policy, tokenizer = shipped
    expected = pretrain.model_config(tokenizer).to_dict()
    actual = GPT2Config.from_pretrained(str(review_gpt2_dir())).to_dict()
    for key in _PROVENANCE:
        expected.pop(key, None), actual.pop(key, None)
    assert actual == expected
    assert (policy.config.n_layer, policy.config.n_embd, policy.config.vocab_size) == (pretrain.N_LAYER, pretrain.N_EMBD, 8000)


def test_shipped_model_predicts_heldout_reviews_far_better_than_random_init(shipped):
    """Perplexity on test-split reviews: the shipped LM ~ 175, the same shape at random init ~ 8,000 (the vocabulary)."""
    policy, tokenizer = shipped
    chunks = pretrain.heldout_chunks(tokenizer, HELDOUT_REVIEWS)
    trained = pretrain.perplexity(policy.pretrained_model, chunks, tokenizer.pad_token_id)
    torch.manual_seed(0)
    random_init = pretrain.perplexity(GPT2LMHeadModel(pretrain.model_config(tokenizer)), chunks, tokenizer.pad_token_id)
    assert trained < 300 and random_init > 4000
    assert random_init / trained > 20


def test_loads_in_the_configured_dtype_with_a_fixed_value_head(shipped):
    policy, _ = shipped
    assert all(parameter.dtype == torch.float32 for parameter in policy.parameters())  # stored fp16, upcast
    rng_before = torch.get_rng_state()
    again, _ = load_policy_and_tokenizer(ModelConfig(source="review_gpt2"))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's seeded stream is left alone
    assert torch.equal(again.v_head.summary.weight, policy.v_head.summary.weight)
    half, _ = load_policy_and_tokenizer(ModelConfig(source="review_gpt2", dtype="bfloat16"))
    assert half.pretrained_model.transformer.wte.weight.dtype == torch.bfloat16


def test_greedy_continuation_is_review_text(shipped):
    """The shipped LM continues a review opening with words, not byte fragments or specials."""
    policy, tokenizer = shipped
    prompt = tokenizer(["this movie was"], return_tensors="pt")
    output = policy.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[a-z']+", text)
    assert len(words) >= 6 and sum(word in tokenizer.get_vocab() or f"Ġ{word}" in tokenizer.get_vocab() for word in words) >= 5


def test_training_chunks_start_each_review_at_position_zero(shipped):
    _, tokenizer = shipped
    texts = ["a good film. " * 40, "bad."]
    chunks = pretrain.review_chunks(tokenizer, texts, block=50)
    first = tokenizer(texts[0])["input_ids"]
    assert len(first) % 50 > 1  # no one-token tail chunk (those are dropped)
    assert chunks[0] == first[:50] and all(len(chunk) <= 50 for chunk in chunks)
    assert chunks[-1] == tokenizer(texts[1])["input_ids"] + [tokenizer.eos_token_id]
    assert sum(map(len, chunks)) == len(first) + 1 + len(chunks[-1])


def test_review_gpt2_of_the_wrong_kind_is_refused():
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="model.kind=causal"):
        load_policy_and_tokenizer(ModelConfig(source="review_gpt2", kind="seq2seq"))
