"""The stream of prompt batches a run trains on, split across processes.

Each epoch is a fresh permutation of the training prompts drawn from ``seed + epoch`` (not from a
global RNG), so the order is a pure function of (seed, epoch) and a run's position is two
integers. Every process sees the same global batch and keeps its own contiguous slice. A batch
holds prompts; with generation.samples_per_prompt=G each is answered G times, so a step takes
ppo.batch_size / G of them and the position counts these prompt batches.
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

    def repeated(self, times: int) -> "PromptBatch":
        """Each prompt ``times`` times in a row (prompt-major: the rows of one prompt's group are
        adjacent, the layout PPOEngine.step expects). The tensors are shared, not copied."""
        return PromptBatch(
            input_ids=[ids for ids in self.input_ids for _ in range(times)],
            queries=[query for query in self.queries for _ in range(times)],
        )


@dataclass
class StreamPosition:
    """Where the stream is: the epoch and the next global batch within it."""

    epoch: int = 0
    batch_in_epoch: int = 0


class PromptStream:
    """Endless iterator of per-process prompt batches over shuffled epochs (drop-last)."""

    def __init__(self, dataset, *, prompts_per_step: int, process_index: int, num_processes: int, seed: int) -> None:
        """``prompts_per_step``: prompts of one global batch, all processes together (ppo.batch_size /
        generation.samples_per_prompt: the batch size counts responses; see TrainingRun.rollout)."""
        per_process(prompts_per_step, num_processes, "prompts per step (ppo.batch_size / generation.samples_per_prompt)")
        if len(dataset) < prompts_per_step:
            raise ConfigError(
                f"The training set has {len(dataset)} prompts, fewer than one step's {prompts_per_step} (ppo.batch_size / "
                f"generation.samples_per_prompt). Lower ppo.batch_size or use more data (dataset.max_samples, "
                f"dataset.min_text_chars)."
            )
        self._ids = [torch.tensor(ids, dtype=torch.long) for ids in dataset["input_ids"]]
        self._queries = list(dataset["query"])
        self.global_batch_size = prompts_per_step
        self.local_batch_size = prompts_per_step // num_processes
        self.process_index = process_index
        self.seed = seed
        self.position = StreamPosition()

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches of prompts in one pass over the training set (drop-last)."""
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
