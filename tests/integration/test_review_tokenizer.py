"""The offline byte-level BPE review tokenizer: clean decoding, no unknowns, the shipped copy, smaller sizes, the cache."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

from rlhf_cli.data import tokenizer as review
from rlhf_cli.data.imdb_local import load_review_texts
from rlhf_cli.data.tokenizer import DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, cache_root, review_tokenizer, review_tokenizer_dir


def normalized(text: str) -> str:
    """What the recipe's normalizer makes of a cleaned review: NFKC, one space between words, lowercase, a leading space."""
    return " " + " ".join(unicodedata.normalize("NFKC", text).split()).lower()


@pytest.fixture(scope="module")
def reviews_tokenizer():
    return review_tokenizer()


@pytest.fixture(scope="module")
def heldout_reviews() -> list[str]:
    return load_review_texts("test")


def test_special_tokens_size_and_pieces(reviews_tokenizer):
    tok = reviews_tokenizer
    assert len(tok) == DEFAULT_VOCAB_SIZE == 8000
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<pad>", "<eos>"]
    # One entry per word with its leading space, also for the first word of a text (no second,
    # space-less entry for "the"), and no special tokens added.
    assert tok.convert_ids_to_tokens(tok("The movie was great.")["input_ids"]) == ["Ġthe", "Ġmovie", "Ġwas", "Ġgreat", "."]
    assert tok("the")["input_ids"] == tok(" the")["input_ids"] == tok("a b the")["input_ids"][-1:]


def test_decoding_is_clean_text_and_joins_like_gpt2(reviews_tokenizer):
    tok = reviews_tokenizer
    text = "I didn't like it, really. The plot (and acting) was bad!"
    assert tok.decode(tok(text)["input_ids"]) == " i didn't like it, really. the plot (and acting) was bad!"
    prompt, response = tok("this film was")["input_ids"], tok(" not good at all")["input_ids"]
    assert tok.decode(prompt) + tok.decode(response) == tok.decode(prompt + response) == " this film was not good at all"
    # A word never seen in training is spelt from smaller pieces, not replaced by <unk>.
    assert tok.decode(tok("the zxqvw movie")["input_ids"]) == " the zxqvw movie"


def test_break_tags_and_whitespace_are_normalised(reviews_tokenizer):
    tok = reviews_tokenizer
    assert tok.decode(tok("Great.<br /><br />Bad<BR>ending<br/>")["input_ids"]) == " great. bad ending"
    assert tok("  GREAT\n\tMovie  ")["input_ids"] == tok("great movie")["input_ids"]
    assert tok("")["input_ids"] == []


def test_heldout_reviews_round_trip_with_no_unknowns(reviews_tokenizer, heldout_reviews):
    """Every held-out (test split) review decodes back to its normalised text; no token is <unk>.

    The old word-level tokenizer lost ~10% of the words of these reviews to <unk> at 4,000 entries.
    """
    tok = reviews_tokenizer
    ids = tok(heldout_reviews, add_special_tokens=False)["input_ids"]
    tokens = sum(map(len, ids))
    unknown = sum(row.count(tok.unk_token_id) for row in ids)
    assert unknown / tokens < 0.001  # measured: 0 of 762,801 tokens
    assert tok.batch_decode(ids) == [normalized(text) for text in heldout_reviews]
    words = sum(len(text.split()) for text in heldout_reviews)
    assert tokens / words < 1.5  # measured 1.35: most words are one entry


def test_frequent_words_are_single_entries(reviews_tokenizer):
    vocab = reviews_tokenizer.get_vocab()
    assert vocab["Ġthe"] < vocab["Ġmovie"] < vocab["Ġgreat"] < 1000
    assert all(f"Ġ{word}" in vocab for word in ("film", "acting", "terrible", "wonderful", "boring", "recommend"))


def test_smaller_sizes_are_the_first_entries_of_a_larger_training():
    """BPE adds merges greedily and never revisits one: training to a smaller size gives exactly
    the first entries and merges of a larger training. review_tokenizer relies on this to cut
    sizes up to 8,000 from the shipped tokenizer instead of training them."""
    texts = load_review_texts("train")[:2000]
    large, small = review.train_review_tokenizer(1500, texts), review.train_review_tokenizer(600, texts)
    cut = review._wrap(review._first_entries(json.loads(large.backend_tokenizer.to_str()), 600))
    assert json.loads(cut.backend_tokenizer.to_str()) == json.loads(small.backend_tokenizer.to_str())
    sample = " ".join(texts[:20])
    assert cut(sample)["input_ids"] == small(sample)["input_ids"]


def test_small_default_sizes_need_no_training(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("sizes up to the shipped one are cut from the shipped tokenizer, not trained")

    monkeypatch.setattr(review, "train_review_tokenizer", no_training)
    small = review_tokenizer(1000)
    assert len(small) == 1000 and small.decode(small("An utterly charming film.")["input_ids"]) == " an utterly charming film."


@pytest.mark.slow
def test_shipped_tokenizer_is_the_recipe_trained_on_the_train_reviews(reviews_tokenizer):
    """The shipped copy (rlhf_cli/assets/review_gpt2) is what the recipe trains today (~15 s):
    a recipe change without a re-shipped review LM fails here."""
    fresh = review.train_review_tokenizer(DEFAULT_VOCAB_SIZE)
    assert json.loads(fresh.backend_tokenizer.to_str()) == json.loads(reviews_tokenizer.backend_tokenizer.to_str())


def test_training_is_deterministic(monkeypatch):
    """Same texts, same vocabulary: also with parallel counting, and with ties at the vocabulary cut."""
    texts = load_review_texts("train")[:2000]
    serial = review.train_review_tokenizer(1500, texts)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    parallel = review.train_review_tokenizer(1500, texts)
    assert json.loads(serial.backend_tokenizer.to_str()) == json.loads(parallel.backend_tokenizer.to_str())


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_CLI_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "rlhf_cli"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rlhf_cli"
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    directory = review_tokenizer_dir(9000)
    assert directory.parent == tmp_path / "mine" / "tokenizers"
    assert directory.name.startswith("reviews-v9000-") and len(directory.name) == len("reviews-v9000-") + 10


@pytest.fixture()
def quick_training(monkeypatch):
    """Sizes above the shipped one are trained: stand in a small training so cache tests take no time."""
    texts, original, built = load_review_texts("train")[:200], review.train_review_tokenizer, []

    def train(vocab_size, corpus=None):
        built.append(vocab_size)
        return original(400, texts)

    monkeypatch.setattr(review, "train_review_tokenizer", train)
    return built


def test_larger_sizes_are_trained_once_then_loaded_from_cache(quick_training, tmp_path):
    first = review_tokenizer(9000, cache_dir=tmp_path)
    again = review_tokenizer(9000, cache_dir=tmp_path)
    assert quick_training == [9000]  # the second call read the cache
    assert again.get_vocab() == first.get_vocab()
    target = review_tokenizer_dir(9000, tmp_path)
    assert sorted(os.listdir(target.parent)) == [target.name]
    assert (target / "tokenizer.json").is_file() and oct(target.stat().st_mode & 0o777) == "0o755"


def test_concurrent_build_keeps_the_first_complete_copy(quick_training, tmp_path):
    """If another process renamed its build into place first, ours is discarded and no temp dir is left."""
    target = review_tokenizer_dir(9000, tmp_path)
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("{}")
    marker = target / "winner.txt"
    marker.write_text("first")
    review._build_into(target, 9000)
    assert marker.read_text() == "first"
    assert sorted(os.listdir(target.parent)) == [target.name]


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match=f"vocab_size must be at least {MIN_VOCAB_SIZE}"):
        review_tokenizer(vocab_size=MIN_VOCAB_SIZE - 1)
