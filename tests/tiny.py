"""Tiny models and tokenizers built from config for tests: nothing is downloaded."""

from __future__ import annotations

import torch

WORDS = (
    "the a an and or but this that it is was were be movie film story plot actor actors acting "
    "good great wonderful excellent best love loved fun enjoy beautiful bad terrible awful worst boring "
    "hate dull poor very really not no so too i you we they he she my our of in on at to for with "
    "scene scenes music ending end character characters time people watch watched see seen "
    ". , ! ?"
).split()


def make_word_tokenizer(words: tuple[str, ...] | list[str] = WORDS):
    """A word-level PreTrainedTokenizerFast over ``words`` with <pad>, <eos> (also bos) and <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>", unk_token="<unk>"
    )


def make_tiny_gpt2(tokenizer, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seed: int = 0, dropout: float = 0.0):
    """A randomly initialised GPT-2 language model sized for tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def make_tiny_t5(tokenizer, *, seed: int = 0):
    """A randomly initialised T5 sized for tests (pad is the decoder start, as in T5)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)
