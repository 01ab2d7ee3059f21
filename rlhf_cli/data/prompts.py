"""Prompt datasets: load, clean, filter, shuffle, hold out, tokenise and length-sample.

Pipeline of :func:`build_prompt_data` (one ``dataset`` config node in, two Datasets out):

1. load ``dataset.split`` of ``dataset.source`` and keep only ``dataset.text_column`` (as ``text``);
2. clean ``<br />`` tags (``dataset.clean_html``), drop texts shorter than ``dataset.min_text_chars``;
3. shuffle with a NumPy permutation seeded by ``dataset.shuffle_seed`` (null: the run seed);
4. held-out rows: the first ``dataset.eval_size`` rows of ``dataset.eval_split`` (prepared the
   same way) if it is set, else the first ``eval_size`` shuffled rows, which are then never trained on;
5. ``dataset.max_samples`` caps the training rows (held-out rows are not counted);
6. each text is cut to a prompt length drawn uniformly from ``[prompt_min_tokens, prompt_max_tokens]``
   (inclusive) by a NumPy Generator seeded from the run seed (train and held-out use separate
   streams); texts with fewer than ``prompt_min_tokens`` tokens are dropped; ``query`` is the decoded prompt.

Everything stays in memory (``keep_in_memory``, explicit fingerprints), so nothing is written to the
datasets cache, the package directory or the working directory, and no global RNG is touched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from rlhf_cli.data.chat_prompts import chat_prompt_data, is_conversational
from rlhf_cli.data.sources import datasets_quiet, describe_source, load_text_dataset, prompt_table_features
from rlhf_cli.data.text import clean_html_batch
from rlhf_cli.errors import DataError

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

# Prompts are tokenised from a whitespace-bounded prefix of each text instead of the whole review
# (reviews average ~270 tokens, prompts are ~8): ~30x less tokenisation. The prefix is long enough for
# the sampled length plus a margin; if it still yields too few tokens the whole text is tokenised.
# This equals tokenising the whole text for every tokenizer whose pieces never span whitespace
# (byte-level BPE, SentencePiece, WordPiece, the review tokenizer).
_PREFIX_CHARS_PER_TOKEN = 16
_PREFIX_MARGIN_TOKENS = 2
_TRAIN_STREAM, _HELDOUT_STREAM = 1, 2  # independent NumPy streams for prompt lengths
_SEED_MODULUS = 2**63  # NumPy seeds must be non-negative


@dataclass(frozen=True)
class PromptData:
    """Tokenised prompts: ``train`` for PPO, ``heldout`` for before/after tables.

    Both have columns ``input_ids`` (list[int], no special tokens) and ``query`` (the decoded prompt).
    """

    train: "datasets.Dataset"
    heldout: "datasets.Dataset"


@dataclass
class _Funnel:
    """Row counts after each stage, for the message when nothing is left."""

    stages: list[tuple[str, int, str]]  # (what the rows are, how many, config key that filters them)

    def add(self, what: str, count: int, knob: str = "") -> None:
        self.stages.append((what, count, knob))

    def describe(self) -> str:
        return " -> ".join(f"{count} {what}" for what, count, _ in self.stages)

    def culprit(self) -> str:
        """The config key of the first stage that left no rows."""
        for _, count, knob in self.stages:
            if count == 0 and knob:
                return knob
        return ""


def build_prompt_data(cfg: Any, tokenizer: "PreTrainedTokenizerBase", seed: int) -> PromptData:
    """Prompt datasets for ``cfg`` (a DatasetConfig), tokenised with ``tokenizer``; see the module docstring."""
    _check_knobs(cfg)
    raw = load_text_dataset(cfg, split=cfg.split)
    if is_conversational(raw, cfg.text_column):  # lists of messages: rendered by the chat template
        heldout_raw = load_text_dataset(cfg, split=cfg.eval_split) if cfg.eval_split is not None else None
        train, heldout = chat_prompt_data(raw, cfg, tokenizer, seed, heldout_raw)
        return PromptData(train=train, heldout=heldout)
    shuffle_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
    texts, funnel = _prepared_texts(cfg, cfg.split, raw)
    order = _permutation(len(texts), shuffle_seed)
    if cfg.eval_split is not None:
        heldout_texts, heldout_funnel = _prepared_texts(cfg, cfg.eval_split)
        heldout_order = _permutation(len(heldout_texts), shuffle_seed)
        heldout_rows = _select(heldout_texts, heldout_order[: cfg.eval_size])
        train_order = order
    else:
        heldout_funnel = _Funnel(list(funnel.stages))
        heldout_rows = _select(texts, order[: cfg.eval_size])
        train_order = order[cfg.eval_size :]
        funnel.add(f"left after holding out dataset.eval_size={cfg.eval_size}", len(train_order), "dataset.eval_size")
    if cfg.max_samples is not None:
        train_order = train_order[: cfg.max_samples]
        funnel.add(f"kept by dataset.max_samples={cfg.max_samples}", len(train_order), "dataset.max_samples")
    train = _tokenized(_select(texts, train_order), tokenizer, cfg, seed, _TRAIN_STREAM)
    heldout = _tokenized(heldout_rows, tokenizer, cfg, seed, _HELDOUT_STREAM)
    token_stage = f"with at least dataset.prompt_min_tokens={cfg.prompt_min_tokens} tokens"
    funnel.add(token_stage, len(train), "dataset.prompt_min_tokens")
    if len(train) == 0:
        _raise_empty("training prompts", describe_source(cfg), funnel)
    if cfg.eval_size > 0 and len(heldout) == 0:
        heldout_funnel.add(f"taken as held-out (dataset.eval_size={cfg.eval_size})", len(heldout_rows), "dataset.eval_size")
        heldout_funnel.add(token_stage, 0, "dataset.prompt_min_tokens")
        _raise_empty("held-out prompts", describe_source(cfg, cfg.eval_split), heldout_funnel)
    return PromptData(train=train, heldout=heldout)


def collate_queries(rows: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]]) -> list["torch.Tensor"]:
    """Query token ids as 1-D LongTensors (one per prompt, unpadded).

    Accepts a list of rows (what a DataLoader hands its ``collate_fn``) or a column dict (``dataset[i:j]``).
    """
    import torch

    ids = rows["input_ids"] if isinstance(rows, Mapping) else [row["input_ids"] for row in rows]
    return [torch.tensor(list(row_ids), dtype=torch.long) for row_ids in ids]


def _check_knobs(cfg: Any) -> None:
    if not 1 <= cfg.prompt_min_tokens <= cfg.prompt_max_tokens:
        raise DataError(
            f"dataset.prompt_min_tokens={cfg.prompt_min_tokens} and dataset.prompt_max_tokens={cfg.prompt_max_tokens} "
            f"must satisfy 1 <= prompt_min_tokens <= prompt_max_tokens; prompt lengths are drawn from that range."
        )
    if cfg.eval_size < 0:
        raise DataError(f"dataset.eval_size={cfg.eval_size} must be >= 0 (0: no held-out prompts).")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise DataError(f"dataset.max_samples={cfg.max_samples} must be >= 1, or null to keep every text.")
    if cfg.min_text_chars < 0:
        raise DataError(f"dataset.min_text_chars={cfg.min_text_chars} must be >= 0.")


def _prepared_texts(cfg: Any, split: str, raw: "datasets.Dataset | None" = None) -> tuple["datasets.Dataset", _Funnel]:
    """Stages 1-2: the loaded (``raw``, if already), cleaned, length-filtered texts of ``split`` as a
    one-column ("text") Dataset."""
    raw = load_text_dataset(cfg, split=split) if raw is None else raw
    funnel = _Funnel([])
    funnel.add(f"rows in the {describe_source(cfg, split)}", len(raw))
    texts = raw.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        texts = texts.rename_column(cfg.text_column, "text")
    min_chars = cfg.min_text_chars
    with datasets_quiet():
        if cfg.clean_html:
            texts = texts.map(
                lambda batch: {"text": clean_html_batch(batch["text"])},
                batched=True,
                keep_in_memory=True,
                new_fingerprint=_fingerprint(),
            )
        texts = texts.filter(
            lambda batch: [text is not None and len(text) >= min_chars for text in batch["text"]],
            batched=True,
            keep_in_memory=True,
            new_fingerprint=_fingerprint(),
        )
    funnel.add(f"with at least dataset.min_text_chars={min_chars} characters", len(texts), "dataset.min_text_chars")
    return texts, funnel


def _tokenized(
    texts: "datasets.Dataset", tokenizer: "PreTrainedTokenizerBase", cfg: Any, seed: int, stream: int
) -> "datasets.Dataset":
    """Stage 6: ``texts`` -> Dataset(input_ids, query), one prompt length drawn per row in row order."""
    import datasets

    features = prompt_table_features()
    if len(texts) == 0:  # map() skips empty datasets without applying `features`: build the empty table here
        return datasets.Dataset.from_dict({"input_ids": [], "query": []}, features=features)
    rng = np.random.default_rng([seed % _SEED_MODULUS, stream])
    lengths = rng.integers(cfg.prompt_min_tokens, cfg.prompt_max_tokens + 1, size=len(texts))
    min_tokens = cfg.prompt_min_tokens

    def to_prompts(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        batch_lengths = [int(lengths[index]) for index in indices]
        ids = _leading_token_ids(tokenizer, batch["text"], batch_lengths)
        kept = [row_ids[:length] for row_ids, length in zip(ids, batch_lengths) if len(row_ids) >= min_tokens]
        return {"input_ids": kept, "query": tokenizer.batch_decode(kept)}

    # A batched map may return fewer rows than it got: dropping short texts needs no second pass.
    # Explicit features keep the columns even when there are no rows (eval_size=0).
    with datasets_quiet():
        return texts.map(
            to_prompts,
            batched=True,
            with_indices=True,
            remove_columns=texts.column_names,
            features=features,
            keep_in_memory=True,
            new_fingerprint=_fingerprint(),
        )


def _leading_token_ids(tokenizer: "PreTrainedTokenizerBase", texts: list[Optional[str]], lengths: list[int]) -> list[list[int]]:
    """For each text, token ids that agree with tokenising the whole text on at least the first ``length`` ids.

    A returned list shorter than ``length`` is the whole text's tokenisation.
    """
    texts = [text or "" for text in texts]
    prefixes = [_whitespace_prefix(text, _PREFIX_CHARS_PER_TOKEN * (length + _PREFIX_MARGIN_TOKENS)) for text, length in zip(texts, lengths)]
    ids = _encode(tokenizer, prefixes)
    short = [
        row
        for row, (prefix, text, length) in enumerate(zip(prefixes, texts, lengths))
        if len(prefix) < len(text) and len(ids[row]) < length + _PREFIX_MARGIN_TOKENS
    ]
    if short:
        for row, row_ids in zip(short, _encode(tokenizer, [texts[row] for row in short])):
            ids[row] = row_ids
    return ids


def _whitespace_prefix(text: str, max_chars: int) -> str:
    """``text`` cut before the last whitespace within ``max_chars`` (the whole text if it is short or has none)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut] if cut > 0 else text


def _encode(tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> list[list[int]]:
    # verbose=False: full texts may exceed model_max_length; they are cut right after, so the warning is noise.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _permutation(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed % _SEED_MODULUS).permutation(size)


def _select(texts: "datasets.Dataset", rows: np.ndarray) -> "datasets.Dataset":
    return texts.select(rows, keep_in_memory=True, new_fingerprint=_fingerprint())


def _fingerprint() -> str:
    """A fresh fingerprint: nothing is cached, and it spares datasets from hashing the tokenizer."""
    return uuid.uuid4().hex


def _raise_empty(what: str, source: str, funnel: _Funnel) -> None:
    culprit = funnel.culprit()
    relax = f"Relax {culprit}" if culprit else "Relax the filters"
    raise DataError(
        f"No {what} are left from the {source}: {funnel.describe()}. {relax} (the knobs are "
        f"dataset.min_text_chars, dataset.prompt_min_tokens, dataset.max_samples and dataset.eval_size), "
        f"or point the dataset at more text."
    )
