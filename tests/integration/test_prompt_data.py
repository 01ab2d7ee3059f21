"""Prompt datasets: the packaged IMDb reviews, local files, and the prompt pipeline's properties."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.data import (
    build_prompt_data,
    collate_queries,
    load_imdb_reviews,
    load_review_texts,
    load_text_dataset,
    review_tokenizer,
)
from rlhf_cli.data.prompts import _leading_token_ids
from rlhf_cli.errors import DataError


def dataset_cfg(**fields):
    """A dataset config node with the schema's defaults (as Hydra would compose it)."""
    base = {
        "source": "imdb_local",
        "path": None,
        "name": None,
        "data_files": [],
        "split": "train",
        "eval_split": None,
        "eval_size": 16,
        "text_column": "text",
        "min_text_chars": 200,
        "clean_html": True,
        "prompt_min_tokens": 2,
        "prompt_max_tokens": 8,
        "shuffle_seed": None,
        "max_samples": None,
    }
    return OmegaConf.create({**base, **fields})


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """load_dataset (files source) prepares Arrow files in the datasets cache: keep them out of ~/.cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="session")
def reviews_tokenizer():
    return review_tokenizer()


@pytest.fixture(scope="session")
def numbered_tokenizer():
    """Word-level over w0..w999 plus filler words: the first token of a text identifies its row."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", *(f"w{i}" for i in range(1000)), "good", "bad", "movie", "."]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE (GPT-2 style) trained on 300 reviews: decoding reproduces the text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(load_review_texts("train")[:300], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def col(dataset, name: str) -> list:
    """A column as a plain list (datasets returns a lazy Column object)."""
    return list(dataset[name])


def numbered_rows(count: int, words_per_row: int = 12) -> list[str]:
    return [" ".join([f"w{i}"] + ["good movie ."] * (words_per_row // 3)) for i in range(count)]


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: text, "label": index % 2}) + "\n" for index, text in enumerate(texts)))
    return str(path)


# --- packaged IMDb reviews ---------------------------------------------------------------------------


def test_imdb_splits_are_fixed_disjoint_and_cleaned():
    train, test = load_imdb_reviews("train"), load_imdb_reviews("test")
    assert (len(train), len(test)) == (22546, 2454)
    assert train.column_names == ["text", "label"] and train.features["label"].names == ["neg", "pos"]
    assert not set(train["text"]) & set(test["text"])
    assert abs(sum(test["label"]) / len(test) - 0.5) < 0.03  # the hash split is label-blind
    assert not any("<br" in text or "  " in text for text in train["text"])
    raw = load_imdb_reviews("train", clean_html=False)
    assert sum("<br />" in text for text in raw["text"]) > 10000
    assert load_review_texts("test") == list(test["text"])


def test_imdb_unknown_split_lists_valid_ones():
    with pytest.raises(DataError, match=r"Unknown split 'validation' .* valid splits are train, test"):
        load_imdb_reviews("validation")


# --- prompt pipeline on IMDb ---------------------------------------------------------------------------


def test_same_seed_same_prompts_different_seed_different(reviews_tokenizer):
    cfg = dataset_cfg(max_samples=200, prompt_min_tokens=3, prompt_max_tokens=6)
    np.random.seed(123)
    torch.manual_seed(123)
    first = build_prompt_data(cfg, reviews_tokenizer, seed=0)
    np.random.seed(999)  # the global RNGs play no part
    torch.manual_seed(999)
    again = build_prompt_data(cfg, reviews_tokenizer, seed=0)
    other = build_prompt_data(cfg, reviews_tokenizer, seed=1)
    assert col(first.train, "query") == col(again.train, "query") and col(first.heldout, "query") == col(again.heldout, "query")
    assert col(first.train, "input_ids") == col(again.train, "input_ids")
    assert col(first.train, "query") != col(other.train, "query")
    assert (len(first.train), len(first.heldout)) == (200, 16)

    lengths = [len(ids) for ids in col(first.train, "input_ids")]
    assert min(lengths) == 3 and max(lengths) == 6  # every length in range, both ends drawn
    assert set(lengths) == {3, 4, 5, 6}
    assert col(first.train, "query") == reviews_tokenizer.batch_decode(col(first.train, "input_ids"))
    assert first.train.column_names == ["input_ids", "query"]


def test_prefix_tokenisation_equals_full_tokenisation(reviews_tokenizer, bpe_tokenizer):
    texts = load_review_texts("train")[:400] + ["x" * 3000 + " good movie", "a" + " " * 500 + "b"]
    lengths = [8] * len(texts)
    for tokenizer in (reviews_tokenizer, bpe_tokenizer):
        full = tokenizer(texts, add_special_tokens=False)["input_ids"]
        fast = _leading_token_ids(tokenizer, texts, lengths)
        assert [ids[:8] for ids in fast] == [ids[:8] for ids in full]


def test_eval_split_gives_heldout_prompts_from_that_split(reviews_tokenizer):
    cfg = dataset_cfg(eval_split="test", eval_size=5, max_samples=40, prompt_max_tokens=8)
    data = build_prompt_data(cfg, reviews_tokenizer, seed=3)
    assert (len(data.train), len(data.heldout)) == (40, 5)  # no training row is held out
    test_texts = [text for text in load_review_texts("test") if len(text) >= 200]
    prefixes = {tuple(ids[:n]) for ids in _leading_token_ids(reviews_tokenizer, test_texts, [8] * len(test_texts)) for n in range(2, 9)}
    assert all(tuple(ids) in prefixes for ids in col(data.heldout, "input_ids"))


# --- prompt pipeline on local files ---------------------------------------------------------------------


def test_heldout_rows_are_never_trained_on(tmp_path, numbered_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows(100))
    cfg = dataset_cfg(source="files", data_files=[path], min_text_chars=0, eval_size=10)
    data = build_prompt_data(cfg, numbered_tokenizer, seed=0)
    train_rows = {ids[0] for ids in col(data.train, "input_ids")}
    heldout_rows = {ids[0] for ids in col(data.heldout, "input_ids")}
    assert (len(train_rows), len(heldout_rows)) == (90, 10)
    assert not train_rows & heldout_rows
    assert len(train_rows | heldout_rows) == 100

    capped = build_prompt_data(OmegaConf.merge(cfg, {"max_samples": 20}), numbered_tokenizer, seed=0)
    assert len(capped.train) == 20 and col(capped.heldout, "input_ids") == col(data.heldout, "input_ids")
    assert col(capped.train, "input_ids") == col(data.train, "input_ids")[:20]


def test_shuffle_seed_fixes_the_order_independently_of_the_run_seed(tmp_path, numbered_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows(50))
    cfg = dataset_cfg(source="files", data_files=[path], min_text_chars=0, eval_size=0, shuffle_seed=7)
    a = build_prompt_data(cfg, numbered_tokenizer, seed=0)
    b = build_prompt_data(cfg, numbered_tokenizer, seed=1)
    assert [ids[0] for ids in col(a.train, "input_ids")] == [ids[0] for ids in col(b.train, "input_ids")]
    assert [len(ids) for ids in col(a.train, "input_ids")] != [len(ids) for ids in col(b.train, "input_ids")]
    assert len(a.heldout) == 0 and a.heldout.column_names == ["input_ids", "query"]


def test_html_is_cleaned_unless_disabled(tmp_path, bpe_tokenizer):
    texts = [f"Row {i}.<br /><br />A fine   film<BR>really, truly fine." for i in range(20)]
    path = write_jsonl(tmp_path / "html.jsonl", texts)
    cfg = dataset_cfg(source="files", data_files=[path], min_text_chars=0, eval_size=2, prompt_min_tokens=11, prompt_max_tokens=14)
    cleaned = build_prompt_data(cfg, bpe_tokenizer, seed=0)
    cleaned_texts = [f"Row {i}. A fine film really, truly fine." for i in range(20)]
    assert len(cleaned.train) == 18
    assert all(any(text.startswith(query) for text in cleaned_texts) for query in col(cleaned.train, "query"))
    raw = build_prompt_data(OmegaConf.merge(cfg, {"clean_html": False}), bpe_tokenizer, seed=0)
    assert all(any(text.startswith(query) for text in texts) for query in col(raw.train, "query"))
    assert all("<br /" in query for query in col(raw.train, "query"))  # "Row 10.<br /" is 11 BPE tokens


def test_jsonl_csv_and_txt_files_give_the_same_prompts(tmp_path, numbered_tokenizer):
    texts = numbered_rows(30)
    jsonl = write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "a.csv").write_text("id,review\n" + "".join(f"{i},{text}\n" for i, text in enumerate(texts)))
    (tmp_path / "a.txt").write_text("".join(text + "\n" for text in texts))
    common = dict(source="files", min_text_chars=0, eval_size=4)
    from_jsonl = build_prompt_data(dataset_cfg(data_files=[jsonl], **common), numbered_tokenizer, seed=5)
    from_csv = build_prompt_data(dataset_cfg(data_files=[str(tmp_path / "a.csv")], text_column="review", **common), numbered_tokenizer, seed=5)
    from_txt = build_prompt_data(dataset_cfg(data_files=[str(tmp_path / "a.txt")], **common), numbered_tokenizer, seed=5)
    assert col(from_jsonl.train, "query") == col(from_csv.train, "query") == col(from_txt.train, "query")
    assert len(from_jsonl.train) == 26


def test_several_files_and_globs(tmp_path, numbered_tokenizer):
    write_jsonl(tmp_path / "part1.jsonl", numbered_rows(10))
    write_jsonl(tmp_path / "part2.jsonl", numbered_rows(25)[10:])
    dataset = load_text_dataset(dataset_cfg(source="files", data_files=[str(tmp_path / "part*.jsonl")]))
    assert len(dataset) == 25
    with pytest.raises(DataError, match=r"pattern '.*nomatch\*\.jsonl' matches no file"):
        load_text_dataset(dataset_cfg(source="files", data_files=[str(tmp_path / "nomatch*.jsonl")]))


def test_nothing_is_written_to_the_working_directory(tmp_path, monkeypatch, numbered_tokenizer):
    data_dir, work_dir = tmp_path / "data", tmp_path / "work"
    data_dir.mkdir()
    work_dir.mkdir()
    path = write_jsonl(data_dir / "rows.jsonl", numbered_rows(20))
    monkeypatch.chdir(work_dir)
    build_prompt_data(dataset_cfg(source="files", data_files=[path], min_text_chars=0, eval_size=2), numbered_tokenizer, seed=0)
    assert os.listdir(work_dir) == [] and os.listdir(data_dir) == ["rows.jsonl"]


def test_collate_queries_gives_long_tensors(tmp_path, numbered_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows(10))
    data = build_prompt_data(dataset_cfg(source="files", data_files=[path], min_text_chars=0, eval_size=0), numbered_tokenizer, seed=0)
    from_rows = collate_queries([data.train[i] for i in range(3)])
    from_slice = collate_queries(data.train[:3])
    for tensor, tensor_again, ids in zip(from_rows, from_slice, col(data.train, "input_ids")[:3]):
        assert tensor.dtype == torch.long and tensor.dim() == 1
        assert tensor.tolist() == tensor_again.tolist() == ids


# --- error messages ------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.data_files names '.*missing\.jsonl', which is not a file"):
        load_text_dataset(dataset_cfg(source="files", data_files=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(DataError, match=r"dataset\.source=files needs dataset\.data_files"):
        load_text_dataset(dataset_cfg(source="files"))


def test_missing_text_column_lists_columns_and_suggests(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", ["some text"] * 3, key="review_text")
    with pytest.raises(DataError) as info:
        load_text_dataset(dataset_cfg(source="files", data_files=[path]))
    message = str(info.value)
    assert "has no column 'text' (dataset.text_column); its columns are review_text, label." in message
    assert "Set dataset.text_column=review_text." in message
    with pytest.raises(DataError, match=r"Column 'label' .* holds Value\('int64'\), not text.*text columns: review_text"):
        load_text_dataset(dataset_cfg(source="files", data_files=[path], text_column="label"))


def test_mixed_or_unknown_formats_and_unknown_source(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "b.csv").write_text("text\ny\n")
    (tmp_path / "c.xml").write_text("<x/>")
    with pytest.raises(DataError, match=r"mixes file formats .*a\.jsonl -> json; .*b\.csv -> csv"):
        load_text_dataset(dataset_cfg(source="files", data_files=[jsonl, str(tmp_path / "b.csv")]))
    with pytest.raises(DataError, match=r"extension '\.xml'; supported extensions are \.json, \.jsonl, \.csv, \.parquet, \.txt"):
        load_text_dataset(dataset_cfg(source="files", data_files=[str(tmp_path / "c.xml")]))
    with pytest.raises(DataError, match=r"Unknown dataset\.source 'web'; valid sources are imdb_local, hub, files"):
        load_text_dataset(dataset_cfg(source="web"))
    with pytest.raises(DataError, match=r"dataset\.source=files reads all dataset\.data_files as one table, so it has no split 'test'"):
        build_prompt_data(dataset_cfg(source="files", data_files=[jsonl], eval_split="test"), None, seed=0)


def test_uncached_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"Hub is offline .*dataset\.source=files dataset\.data_files=\[.*dataset\.source=imdb_local"):
        load_text_dataset(dataset_cfg(source="hub", path="someone/uncached-reviews"))
    with pytest.raises(DataError, match=r"dataset\.source=hub needs dataset\.path"):
        load_text_dataset(dataset_cfg(source="hub"))


@pytest.mark.parametrize(
    ("fields", "culprit", "counts"),
    [
        ({"min_text_chars": 10_000}, "dataset.min_text_chars", "0 with at least dataset.min_text_chars=10000 characters"),
        ({"prompt_min_tokens": 50, "prompt_max_tokens": 60}, "dataset.prompt_min_tokens", "0 with at least dataset.prompt_min_tokens=50 tokens"),
        ({"eval_size": 12}, "dataset.eval_size", "0 left after holding out dataset.eval_size=12"),
    ],
)
def test_empty_after_filtering_says_where_rows_went(tmp_path, numbered_tokenizer, fields, culprit, counts):
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows(12))
    cfg = dataset_cfg(source="files", data_files=[path], **{"min_text_chars": 0, "eval_size": 2, **fields})
    with pytest.raises(DataError) as info:
        build_prompt_data(cfg, numbered_tokenizer, seed=0)
    message = str(info.value)
    assert message.startswith(f"No training prompts are left from the files ['{path}']: 12 rows in the files")
    assert counts in message and f"Relax {culprit} " in message


@pytest.mark.parametrize(("low", "high"), [(0, 4), (5, 4), (-1, 2)])
def test_bad_prompt_length_range(low, high):
    with pytest.raises(DataError, match=rf"dataset\.prompt_min_tokens={low} and dataset\.prompt_max_tokens={high} must satisfy 1 <="):
        build_prompt_data(dataset_cfg(prompt_min_tokens=low, prompt_max_tokens=high), None, seed=0)


def test_csv_prompts_are_read_as_text(tmp_path):
    """A csv prompt that pandas would take for a missing value ('NA', 'None', 'null') or a number
    (' 10 out of' stays text only beside other text; '2001' alone would be an int) is kept as written."""
    from types import SimpleNamespace

    from rlhf_cli.data.sources import load_text_dataset

    path = tmp_path / "p.csv"
    path.write_text("text,n\nNA,1\nNone,2\nnull,3\n 2001,4\n")
    rows = load_text_dataset(SimpleNamespace(source="files", data_files=[str(path)], text_column="text", split="train"))["text"]
    assert rows == ["NA", "None", "null", " 2001"]
