"""The train and held-out pairs of a ``rlhf reward`` run, from its ``data`` config node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf_cli.data.preferences import (
    PreferencePairs,
    PreferenceRows,
    drop_identical,
    parse_rows,
    read_preference_table,
)
from rlhf_cli.errors import DataError
from rlhf_cli.models.reward_scoring import VALUE_HEAD, encode_texts


@dataclass
class PreferenceData:
    """Tokenised train pairs, held-out pairs (as text too, for the baselines) and the notices to print."""

    train: PreferencePairs
    heldout_rows: PreferenceRows
    heldout: PreferencePairs
    notices: list[str]


def _user_rows(cfg: Any, tokenizer: Any, seed: int) -> tuple[PreferenceRows, PreferenceRows]:
    """(train rows, held-out rows) of files or a Hub dataset."""
    def rows_of(split: str) -> PreferenceRows:
        table = read_preference_table(cfg, split)
        if len(table) == 0:
            raise DataError(f"The preference data (data.source={cfg.source}, split {split}) has no rows.")
        return drop_identical(parse_rows(table, cfg, tokenizer, where=f"the {cfg.source} data (split {split})"))

    rows = rows_of(cfg.split)
    shuffle_seed = seed if cfg.shuffle_seed is None else int(cfg.shuffle_seed)
    order = np.random.default_rng([shuffle_seed, 3]).permutation(len(rows)).tolist()
    rows = rows.select(order)
    if cfg.eval_split:
        heldout = rows_of(cfg.eval_split)
        heldout = heldout.select(range(min(int(cfg.eval_size), len(heldout))))
        heldout.notices = []
    else:
        size = int(cfg.eval_size)
        if size >= len(rows):
            raise DataError(
                f"data.eval_size={size} holds out every one of the {len(rows)} pairs, leaving none to train on. "
                f"Lower data.eval_size, or give held-out pairs of their own with data.eval_split."
            )
        heldout, notices = rows.select(range(size)), rows.notices
        rows = rows.select(range(size, len(rows)))
        rows.notices, heldout.notices = notices, []
    if cfg.max_samples is not None:
        rows = rows.select(range(min(int(cfg.max_samples), len(rows))))
    return rows, heldout


def build_preference_data(cfg: Any, tokenizer: Any, seed: int, head: str = VALUE_HEAD) -> PreferenceData:
    """Read, check and tokenise the pairs ``cfg`` (the ``data`` node) describes, for a ``head`` backbone."""
    if cfg.source == "imdb_pairs":
        from rlhf_cli.data.imdb_pairs import imdb_pair_rows

        from rlhf_cli.data.imdb_local import release_imdb_table

        train_rows = imdb_pair_rows(cfg, "train", int(cfg.train_pairs), tokenizer, seed)
        heldout_rows = imdb_pair_rows(cfg, "test", int(cfg.eval_size), tokenizer, seed)
        release_imdb_table()  # the 25,000 reviews are not needed again: their memory goes before training's
    else:
        train_rows, heldout_rows = _user_rows(cfg, tokenizer, seed)
    if len(train_rows) == 0:
        raise DataError("No training pairs are left after dropping identical ones; check the chosen and rejected columns.")
    max_length = int(cfg.max_length)
    train, heldout = (tokenize_pairs(rows, tokenizer, max_length, head) for rows in (train_rows, heldout_rows))
    notices = list(train_rows.notices)
    for name, pairs in (("training", train), ("held-out", heldout)):
        if pairs.truncated:
            notices.append(
                f"{pairs.truncated} of {len(pairs)} {name} pairs have a text longer than data.max_length={max_length} "
                f"tokens; those texts keep their last {max_length} tokens."
            )
    if train.ties and any(train.ties) and cfg.ties == "skip":
        notices.append(f"{sum(train.ties)} tied training pairs carry no weight (data.ties=skip; data.ties=half trains them towards 0.5).")
    return PreferenceData(train, heldout_rows, heldout, notices)


def tokenize_pairs(rows: PreferenceRows, tokenizer: Any, max_length: int, head: str = VALUE_HEAD) -> PreferencePairs:
    """Token ids of both sides under the scoring rule of a ``head`` backbone (``rlhf_cli.models.reward_scoring``),
    counting the pairs that had a side truncated."""
    chosen_ids, chosen_cut = encode_texts(tokenizer, rows.chosen_texts, max_length, head)
    rejected_ids, rejected_cut = encode_texts(tokenizer, rows.rejected_texts, max_length, head)
    truncated = sum(a or b for a, b in zip(chosen_cut, rejected_cut))
    empty = [i + 1 for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids)) if not c or not r]
    if empty:
        raise DataError(
            f"{len(empty)} pairs have a side with no tokens at all (e.g. pair {empty[0]}); every chosen and rejected "
            f"text needs at least one token. Remove those rows."
        )
    margins = rows.margins if rows.margins is not None else [0.0] * len(rows)
    ties = rows.ties if rows.ties is not None else [False] * len(rows)
    return PreferencePairs(chosen_ids, rejected_ids, list(margins), list(ties), truncated)
