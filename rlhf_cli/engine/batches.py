"""The stream of prompt batches a run trains on, split across processes.

Each epoch is a fresh permutation of the training prompts drawn from ``seed + epoch`` (not from a
global RNG), so the order is a pure function of (seed, epoch) and a run's position is two
integers. Every process sees the same global batch and keeps its own contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rlhf_cli.engine.sizes import per_process
from rlhf_cli.errors import ConfigError


@dataclass
class PromptBatch:
    """This process's share of one global batch: token ids (1-D each) and the prompt texts."""

    input_ids: list[Tensor]
    queries: list[str]


@dataclass
class StreamPosition:
    """Where the stream is: the epoch and the next global batch within it."""

    epoch: int = 0
    batch_in_epoch: int = 0


class PromptStream:
    """Endless iterator of per-process prompt batches over shuffled epochs (drop-last)."""

    def __init__(self, dataset, *, global_batch_size: int, process_index: int, num_processes: int, seed: int) -> None:
        per_process(global_batch_size, num_processes, "ppo.batch_size")  # the launch check's rule and message
        if len(dataset) < global_batch_size:
            raise ConfigError(
                f"The training set has {len(dataset)} prompts, fewer than one batch (ppo.batch_size={global_batch_size}). "
                f"Lower ppo.batch_size or use more data (dataset.max_samples, dataset.min_text_chars)."
            )
        self._ids = [torch.tensor(ids, dtype=torch.long) for ids in dataset["input_ids"]]
        self._queries = list(dataset["query"])
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // num_processes
        self.process_index = process_index
        self.seed = seed
        self.position = StreamPosition()

    @property
    def batches_per_epoch(self) -> int:
        return len(self._ids) // self.global_batch_size

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._ids))

    def next_batch(self) -> PromptBatch:
        """This process's slice of the next global batch; moves the position on."""
        if self.position.batch_in_epoch >= self.batches_per_epoch:
            self.position = StreamPosition(epoch=self.position.epoch + 1, batch_in_epoch=0)
        order = self._order(self.position.epoch)
        start = self.position.batch_in_epoch * self.global_batch_size + self.process_index * self.local_batch_size
        rows = order[start : start + self.local_batch_size]
        self.position = StreamPosition(self.position.epoch, self.position.batch_in_epoch + 1)
        return PromptBatch(input_ids=[self._ids[i] for i in rows], queries=[self._queries[i] for i in rows])
