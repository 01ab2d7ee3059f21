"""Preference files as users have them (issue 19 point 2): csv, parquet and json (a list) give the same
pairs, token ids, margins and ties as the equivalent jsonl, in the explicit, implicit and
conversational formats and with custom column names.

pyarrow is a required dependency (pyproject), so the parquet cases always run; the csv and parquet
files are written with the standard library and pyarrow, not pandas (not a dependency of ours).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_cli.config.reward_schema import PreferenceDataConfig
from rlhf_cli.reward_model.data import build_preference_data
from tests.tiny import WORDS, make_word_tokenizer
from tests.unit.test_preferences import CHAT_TEMPLATE, _ids

EXPLICIT = [
    {"prompt": "the movie", "chosen": " was good", "rejected": " was bad", "margin": 0.5, "tie": False},
    {"prompt": "a film that", "chosen": " i loved", "rejected": " i hate", "margin": 0.0, "tie": True},
    {"prompt": "this story", "chosen": " is fun", "rejected": " is dull", "margin": 1.25, "tie": False},
    {"prompt": "the acting", "chosen": " was great !", "rejected": " was poor .", "margin": 2.0, "tie": False},
]
# The same pairs under the column names a user's labelling tool might have written.
RENAMED = {"prompt": "question", "chosen": "preferred", "rejected": "dispreferred", "margin": "gap", "tie": "draw"}
CUSTOM = {f"{key}_column": value for key, value in RENAMED.items()}
IMPLICIT = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in EXPLICIT]
CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": row["prompt"]}],
     "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
     "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}
    for row in EXPLICIT
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_word_tokenizer([*WORDS, "user", "assistant", ":"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _write(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the format ``path``'s extension names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _data(path: Path, tokenizer, **columns):
    cfg = OmegaConf.structured(PreferenceDataConfig(source="files", data_files=[str(path)], eval_size=1, **columns))
    return build_preference_data(cfg, tokenizer, seed=0)


def _as_tuple(data) -> tuple:
    return tuple((pairs.chosen_ids, pairs.rejected_ids, pairs.margins, pairs.ties) for pairs in (data.train, data.heldout))


def _renamed(rows: list[dict]) -> list[dict]:
    return [{RENAMED[key]: value for key, value in row.items()} for row in rows]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
@pytest.mark.parametrize("layout", ["explicit", "custom_columns", "implicit"])
def test_each_file_type_gives_the_jsonl_pairs(tmp_path, tokenizer, suffix, layout):
    rows = {"explicit": EXPLICIT, "custom_columns": _renamed(EXPLICIT), "implicit": IMPLICIT}[layout]
    columns = CUSTOM if layout == "custom_columns" else {}
    expected = _data(_write(tmp_path / "pairs.jsonl", rows), tokenizer, **columns)
    got = _data(_write(tmp_path / f"pairs{suffix}", rows), tokenizer, **columns)
    assert _as_tuple(got) == _as_tuple(expected)
    # And the jsonl itself against the hand-built ids: every pair is there, whole.
    chosen = sorted(expected.train.chosen_ids + expected.heldout.chosen_ids)
    assert chosen == sorted(_ids(tokenizer, r["prompt"] + r["chosen"]) for r in EXPLICIT)
    if layout != "implicit":  # the implicit files have no margin or tie column
        assert sorted(expected.train.margins + expected.heldout.margins) == sorted(r["margin"] for r in EXPLICIT)
        assert sum(expected.train.ties + expected.heldout.ties) == 1


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_conversational_rows_from_parquet_and_json(tmp_path, tokenizer, suffix):
    """Lists of {role, content} messages survive parquet's nested columns and a JSON list."""
    expected = _data(_write(tmp_path / "chats.jsonl", CONVERSATIONAL), tokenizer)
    got = _data(_write(tmp_path / f"chats{suffix}", CONVERSATIONAL), tokenizer)
    assert _as_tuple(got) == _as_tuple(expected)
    chosen = sorted(expected.train.chosen_ids + expected.heldout.chosen_ids)
    assert chosen == sorted(_ids(tokenizer, f"user : {r['prompt']} . assistant : {r['chosen'].strip()} .") for r in EXPLICIT)


def test_csv_texts_stay_text_when_they_look_like_numbers_or_missing_values(tmp_path, tokenizer):
    """A csv reader left to itself turns '' and 'NA' / 'None' / 'null' into missing values and ' 10' into
    the number 10 (its space gone); a preference text is text whatever it holds. An empty margin or tie
    cell is still 'no value', as a null in jsonl."""
    rows = [
        {"prompt": "", "chosen": "good", "rejected": "bad", "margin": "", "tie": ""},
        {"prompt": "rate it", "chosen": " 10", "rejected": " 1", "margin": 1.5, "tie": True},
        {"prompt": "None", "chosen": " NA", "rejected": " null", "margin": "", "tie": False},
    ]
    as_json = [{k: (None if v == "" and k in ("margin", "tie") else v) for k, v in row.items()} for row in rows]
    expected = _data(_write(tmp_path / "pairs.jsonl", as_json), tokenizer)
    got = _data(_write(tmp_path / "pairs.csv", rows), tokenizer)
    assert _as_tuple(got) == _as_tuple(expected)
    assert sorted(got.train.margins + got.heldout.margins) == [0.0, 0.0, 1.5]
