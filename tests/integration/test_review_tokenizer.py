"""The offline word-level review tokenizer: vocabulary, decoding, cache location, caching, determinism."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf_cli.data import tokenizer as review
from rlhf_cli.data.imdb_local import load_review_texts
from rlhf_cli.data.tokenizer import cache_root, review_tokenizer, review_tokenizer_dir

# The most frequent pieces of the IMDb train reviews (ids 3-22) and the last ones admitted (ids
# 3990-3999, where equally frequent pieces compete for the last slots), as built when this was written.
PINNED_HEAD = [" the", ".", ",", " a", " and", " of", " to", " is", " it", " in", " i", " this", " that", "'s", "-", " was", " as", " for", " with", " movie"]
PINNED_TAIL = ["look", "night", "writer", " 16", " 2005", " abilities", " aimed", " aka", " bone", " combat"]


@pytest.fixture(scope="session")
def reviews_tokenizer():
    """Built once per test session into $RLHF_CLI_CACHE (tests/conftest.py points it at a temp dir)."""
    return review_tokenizer()


def test_special_tokens_and_size(reviews_tokenizer):
    tok = reviews_tokenizer
    assert len(tok) == 4000
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<pad>", "<eos>"]
    ids = tok("The movie was great.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [" the", " movie", " was", " great", "."]  # no special tokens added


def test_decoding_is_readable_and_joins_like_bpe(reviews_tokenizer):
    tok = reviews_tokenizer
    text = "I didn't like it, really. The plot (and acting) was bad!"
    assert tok.decode(tok(text)["input_ids"]) == " i didn't like it, really. the plot (and acting) was bad!"
    prompt, response = tok("this film was")["input_ids"], tok("not good at all")["input_ids"]
    assert tok.decode(prompt) + tok.decode(response) == tok.decode(prompt + response) == " this film was not good at all"
    assert tok.decode(tok("the zxqvw movie")["input_ids"]) == " the <unk> movie"


def test_normalisation_collapses_case_and_whitespace(reviews_tokenizer):
    tok = reviews_tokenizer
    assert tok("  GREAT\n\tMovie  ")["input_ids"] == tok("great movie")["input_ids"]
    assert tok("")["input_ids"] == []


def test_frequent_words_come_first(reviews_tokenizer):
    vocab = reviews_tokenizer.get_vocab()
    assert vocab[" the"] == 3  # the most frequent piece in IMDb reviews
    assert vocab[" movie"] < vocab[" film"] < vocab[" great"] < 1000


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_CLI_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "rlhf_cli"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rlhf_cli"
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    directory = review_tokenizer_dir(4000)
    assert directory.parent == tmp_path / "mine" / "tokenizers"
    assert directory.name.startswith("reviews-v4000-") and len(directory.name) == len("reviews-v4000-") + 10
    assert review_tokenizer_dir(1000).name.startswith("reviews-v1000-")


def test_second_call_loads_from_cache(reviews_tokenizer, monkeypatch):
    directory = review_tokenizer_dir(4000)
    assert (directory / "tokenizer.json").is_file()

    def no_training(vocab_size):
        raise AssertionError("the cached tokenizer should have been loaded, not rebuilt")

    monkeypatch.setattr(review, "_train", no_training)
    again = review_tokenizer()
    text = "An utterly charming film, with a dull second half."
    assert again(text)["input_ids"] == reviews_tokenizer(text)["input_ids"]
    assert again.get_vocab() == reviews_tokenizer.get_vocab()


def test_training_is_deterministic(monkeypatch):
    """Same texts, same vocabulary: also with parallel counting, and with ties at the vocabulary cut.

    2,000 reviews and 1,500 entries put hundreds of equally rare pieces around the cut; the full
    build runs the same code on the full corpus.
    """
    texts = load_review_texts("train")[:2000]
    serial = review._train(1500, texts)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    parallel = review._train(1500, texts)
    assert serial.get_vocab() == parallel.get_vocab()
    assert json.loads(serial.backend_tokenizer.to_str()) == json.loads(parallel.backend_tokenizer.to_str())
    sample = " ".join(texts[:20])
    assert serial(sample)["input_ids"] == parallel(sample)["input_ids"]


def test_the_default_vocabulary_is_pinned(reviews_tokenizer):
    """The full build gives the vocabulary every earlier build gave (first entries by frequency)."""
    assert reviews_tokenizer.convert_ids_to_tokens(list(range(3, 23))) == PINNED_HEAD
    assert reviews_tokenizer.convert_ids_to_tokens(list(range(3990, 4000))) == PINNED_TAIL


def test_concurrent_build_keeps_the_first_complete_copy(reviews_tokenizer, tmp_path, monkeypatch):
    """If another process renamed its build into place first, ours is discarded and no temp dir is left."""
    monkeypatch.setattr(review, "_train", lambda vocab_size: reviews_tokenizer)
    target = review_tokenizer_dir(4000, tmp_path)
    reviews_tokenizer.save_pretrained(str(target))
    marker = target / "winner.txt"
    marker.write_text("first")
    review._build_into(target, 4000)
    assert marker.read_text() == "first"
    assert sorted(os.listdir(target.parent)) == [target.name]


def test_build_into_empty_cache_writes_complete_directory(reviews_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(review, "_train", lambda vocab_size: reviews_tokenizer)
    loaded = review_tokenizer(cache_dir=tmp_path)
    target = review_tokenizer_dir(4000, tmp_path)
    assert sorted(os.listdir(target.parent)) == [target.name]
    assert (target / "tokenizer.json").is_file() and oct(target.stat().st_mode & 0o777) == "0o755"
    assert loaded.get_vocab() == reviews_tokenizer.get_vocab()


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be at least 4"):
        review_tokenizer(vocab_size=3)
