"""Preference data (issue 19): each format's token ids against a hand-built example, and every bad
input's message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_cli.config.reward_schema import PreferenceDataConfig
from rlhf_cli.data.preferences import parse_rows
from rlhf_cli.reward_model.data import tokenize_pairs
from rlhf_cli.errors import DataError
from rlhf_cli.reward_model.data import build_preference_data
from tests.tiny import WORDS, make_word_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_word_tokenizer([*WORDS, "user", "assistant", ":"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _ids(tokenizer, text: str) -> list[int]:
    """Hand-built: the vocabulary entry of each whitespace-separated word."""
    vocab = tokenizer.get_vocab()
    return [vocab[word] for word in text.split()]


def _cfg(tmp_path: Path, rows: list, **overrides) -> tuple:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return OmegaConf.structured(PreferenceDataConfig(source="files", data_files=[str(path)], eval_size=1, **overrides)), path


def _rows(tokenizer, rows, **overrides):
    import datasets

    cfg = OmegaConf.structured(PreferenceDataConfig(source="files", **overrides))
    return parse_rows(datasets.Dataset.from_list(rows), cfg, tokenizer, "test data")


def test_explicit_format(tokenizer):
    rows = _rows(tokenizer, [{"prompt": "the movie", "chosen": " was good", "rejected": " was bad", "label": "x"}])
    pairs = tokenize_pairs(rows, tokenizer, 64)
    assert rows.chosen_prompts == rows.rejected_prompts == ["the movie"]
    assert pairs.chosen_ids == [_ids(tokenizer, "the movie was good")]
    assert pairs.rejected_ids == [_ids(tokenizer, "the movie was bad")]


def test_implicit_format_splits_at_the_shared_prefix(tokenizer):
    rows = _rows(tokenizer, [{"chosen": "the movie was good", "rejected": "the movie was boring"}])
    # The common prefix "the movie was " is cut back to a word boundary: "bo" of boring stays in the response.
    assert rows.chosen_prompts == ["the movie was "] and rows.chosen == ["good"] and rows.rejected == ["boring"]
    pairs = tokenize_pairs(rows, tokenizer, 64)
    assert pairs.chosen_ids == [_ids(tokenizer, "the movie was good")]
    assert pairs.rejected_ids == [_ids(tokenizer, "the movie was boring")]


@pytest.mark.parametrize("with_prompt", [True, False])
def test_conversational_format_uses_the_chat_template(tokenizer, with_prompt):
    user = {"role": "user", "content": "the movie"}
    good, bad = {"role": "assistant", "content": "was good"}, {"role": "assistant", "content": "was bad"}
    row = {"prompt": [user], "chosen": [good], "rejected": [bad]} if with_prompt else {"chosen": [user, good], "rejected": [user, bad]}
    rows = _rows(tokenizer, [row])
    assert rows.chosen_prompts == ["user : the movie . assistant : "]  # rendered with the generation prompt
    pairs = tokenize_pairs(rows, tokenizer, 64)
    assert pairs.chosen_ids == [_ids(tokenizer, "user : the movie . assistant : was good .")]
    assert pairs.rejected_ids == [_ids(tokenizer, "user : the movie . assistant : was bad .")]


def test_custom_columns_margin_and_tie(tokenizer):
    rows = _rows(tokenizer, [{"q": "the", "a": " good", "b": " bad", "m": 0.5, "t": True}],
                 prompt_column="q", chosen_column="a", rejected_column="b", margin_column="m", tie_column="t")
    pairs = tokenize_pairs(rows, tokenizer, 64)
    assert pairs.margins == [0.5] and pairs.ties == [True]


def test_missing_column_names_the_closest(tmp_path, tokenizer):
    cfg, _ = _cfg(tmp_path, [{"prompt": "the", "chosen": " good", "rejectd": " bad"}] * 3)
    with pytest.raises(DataError, match=r"no column 'rejected' \(data.rejected_column\).*closest existing column is 'rejectd'"):
        build_preference_data(cfg, tokenizer, seed=0)


def test_empty_file(tmp_path, tokenizer):
    cfg, path = _cfg(tmp_path, [])
    with pytest.raises(DataError, match=f"The data file {path} \\(data.data_files\\) is empty"):
        build_preference_data(cfg, tokenizer, seed=0)


def test_malformed_row_names_file_and_line(tmp_path, tokenizer):
    cfg, path = _cfg(tmp_path, [{"prompt": "the", "chosen": " good", "rejected": " bad"}])
    path.write_text(path.read_text() + "{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{path} has a malformed JSON line: line 2"):
        build_preference_data(cfg, tokenizer, seed=0)


def test_non_text_value_names_the_row(tmp_path, tokenizer):
    """datasets >= 4 reads the mixed column and our check names the row; 3.x (the supported floor)
    refuses the file itself, and the paragraph then names the file and the format to check."""
    import datasets

    cfg, _ = _cfg(tmp_path, [{"prompt": "the", "chosen": " good", "rejected": " bad"}, {"prompt": "the", "chosen": 3, "rejected": " bad"}])
    reads_mixed_columns = int(datasets.__version__.split(".")[0]) >= 4
    expected = "chosen of row 2 .* is int" if reads_mixed_columns else "Could not read data.data_files .*pairs.jsonl.* as json"
    with pytest.raises(DataError, match=expected):
        build_preference_data(cfg, tokenizer, seed=0)


def test_identical_pairs_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "the", "chosen": " good", "rejected": " bad"}] * 3 + [{"prompt": "the", "chosen": " good", "rejected": " good"}]
    cfg, _ = _cfg(tmp_path, rows)
    data = build_preference_data(cfg, tokenizer, seed=0)
    assert len(data.train) + len(data.heldout) == 3
    assert any("dropped 1 of 4 pairs whose chosen and rejected texts are identical" in n for n in data.notices)


def test_long_texts_are_truncated_with_a_count(tmp_path, tokenizer):
    rows = [{"prompt": "the movie was", "chosen": " very very good", "rejected": " bad"}] * 4
    cfg, _ = _cfg(tmp_path, rows, max_length=4)
    data = build_preference_data(cfg, tokenizer, seed=0)
    assert any("3 of 3 training pairs have a text longer than data.max_length=4" in n for n in data.notices)
    assert data.train.chosen_ids[0] == _ids(tokenizer, "very very good")[-4:] or len(data.train.chosen_ids[0]) == 4
    assert data.train.chosen_ids[0] == _ids(tokenizer, "was very very good")  # the last 4 tokens are kept


def test_several_files_are_read_as_one_table(tmp_path, tokenizer):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps({"prompt": "the", "chosen": " good", "rejected": " bad"}) + "\n")
    second.write_text(json.dumps({"prompt": "a", "chosen": " great", "rejected": " awful", "labeller": "x"}) + "\n" * 1)
    cfg = OmegaConf.structured(PreferenceDataConfig(source="files", data_files=[str(first), str(second)], eval_size=1))
    data = build_preference_data(cfg, tokenizer, seed=0)
    assert len(data.train) + len(data.heldout) == 2


def test_train_prompts_accept_conversational_rows(tmp_path, tokenizer):
    """rlhf train's prompt datasets: a list of messages is rendered with the chat template and its
    generation prompt, whole (no length sampling)."""
    from rlhf_cli.config.schema import DatasetConfig
    from rlhf_cli.data.prompts import build_prompt_data

    path = tmp_path / "chats.jsonl"
    words = ["movie", "film", "story", "plot", "music"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"the {w}"}]}) + "\n" for w in words))
    cfg = OmegaConf.structured(DatasetConfig(source="files", data_files=[str(path)], text_column="messages", eval_size=1))
    data = build_prompt_data(cfg, tokenizer, seed=0)
    assert len(data.train) == 4 and len(data.heldout) == 1
    rendered = sorted([*data.train["query"], *data.heldout["query"]])
    assert rendered == sorted(f"user : the {w} . assistant : " for w in words)
    for row in data.train:
        assert row["input_ids"] == _ids(tokenizer, row["query"])
