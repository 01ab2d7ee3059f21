"""The dataloader ``PPOTrainer(dataset=...)`` builds, collating as legacy TRL's did.

Rows that are tuples, lists or tensors go through torch's default collation (a dataset of
``(query_tensor, response_tensor)`` yields two stacked tensors per batch); dict rows become a dict
of lists, since queries have different lengths and cannot be stacked.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, default_collate

# Columns a datasets.Dataset keeps besides the model's forward arguments (TRL: for logging and rewards).
_KEPT_COLUMNS = ("label", "query", "response")


def collate(rows: list[Any]) -> Any:
    """Dict rows -> dict of lists (ragged token tensors stay a list); other rows -> ``default_collate``."""
    if rows and isinstance(rows[0], Mapping):
        return {key: [row[key] for row in rows] for key in rows[0]}
    return default_collate(rows)


def remove_unused_columns(dataset: Any, forward: Callable) -> Any:
    """A ``datasets.Dataset`` without the columns that ``forward`` does not take (TRL's
    ``remove_unused_columns``); ``label``, ``query`` and ``response`` are kept."""
    keep = set(inspect.signature(forward).parameters) | set(_KEPT_COLUMNS)
    unused = [name for name in dataset.column_names if name not in keep]
    return dataset.remove_columns(unused) if unused else dataset


def build_dataloader(
    dataset: Any,
    *,
    batch_size: int,
    seed: int,
    data_collator: Optional[Callable] = None,
) -> DataLoader:
    """Shuffled batches of ``batch_size`` rows, the last incomplete one dropped (so a dataset smaller
    than ``batch_size`` gives an empty dataloader, as in TRL). The order comes from a generator seeded
    with ``seed``, not from the global RNG."""
    if not isinstance(dataset, torch.utils.data.Dataset) and not is_hf_dataset(dataset):
        raise TypeError(
            f"dataset must be a torch.utils.data.Dataset or a datasets.Dataset, got {type(dataset).__name__}."
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=data_collator or collate,
    )


def is_hf_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is a Hugging Face ``datasets.Dataset``."""
    from datasets import Dataset  # imported here: it takes a second and only dataset users need it

    return isinstance(dataset, Dataset)
