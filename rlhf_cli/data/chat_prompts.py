"""Conversational prompt datasets for ``rlhf train``: a text column holding lists of ``{role, content}``
messages is rendered with the tokenizer's chat template and its generation prompt, so an instruct
model is trained (and a learned reward scores it) on what it would really see.

Each rendered conversation is one whole prompt (no length sampling: cutting a chat mid-template would
make a prompt the model never sees). Shuffling, hold-out and ``max_samples`` follow ``data.prompts``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf_cli.data.preferences import render_chat
from rlhf_cli.data.sources import prompt_table_features
from rlhf_cli.errors import DataError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


def is_conversational(dataset: "datasets.Dataset", column: str) -> bool:
    """Whether ``column`` holds lists of messages (its first row is a list)."""
    return len(dataset) > 0 and isinstance(dataset[0][column], list)


def _rendered(dataset: "datasets.Dataset", column: str, tokenizer: "PreTrainedTokenizerBase") -> list[str]:
    texts = []
    for number, messages in enumerate(dataset[column], start=1):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise DataError(
                f"Row {number} of dataset.text_column '{column}' is not a list of {{role, content}} messages "
                f"({str(messages)[:80]!r}); in a conversational dataset every row must be one."
            )
        texts.append(render_chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages], generation_prompt=True))
    return texts


def chat_prompt_data(train_raw: "datasets.Dataset", cfg: Any, tokenizer: "PreTrainedTokenizerBase", seed: int,
                     heldout_raw: "datasets.Dataset | None" = None) -> "tuple[datasets.Dataset, datasets.Dataset]":
    """(train, heldout) tables of rendered conversations (``input_ids``, ``query`` = the rendered text)."""
    import datasets

    shuffle_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
    texts = _rendered(train_raw, cfg.text_column, tokenizer)
    order = np.random.default_rng(shuffle_seed % 2**63).permutation(len(texts)).tolist()
    if heldout_raw is not None:
        heldout_texts = _rendered(heldout_raw, cfg.text_column, tokenizer)[: cfg.eval_size]
        train_texts = [texts[i] for i in order]
    else:
        heldout_texts = [texts[i] for i in order[: cfg.eval_size]]
        train_texts = [texts[i] for i in order[cfg.eval_size:]]
    if cfg.max_samples is not None:
        train_texts = train_texts[: cfg.max_samples]
    if not train_texts:
        raise DataError(f"No training prompts are left: {len(texts)} conversations, dataset.eval_size={cfg.eval_size} held out.")

    def table(rows: list[str]) -> "datasets.Dataset":
        ids = tokenizer(rows, add_special_tokens=False)["input_ids"] if rows else []
        features = prompt_table_features()
        return datasets.Dataset.from_dict({"input_ids": ids, "query": rows}, features=features)

    return table(train_texts), table(heldout_texts)
