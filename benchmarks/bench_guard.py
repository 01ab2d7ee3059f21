#!/usr/bin/env python
"""CPU cost of the divergence guard (``rlhf_cli.ppo.guard``) per optimiser step, next to the forward,
backward and Adam step it guards.

Tiny GPT-2s built from config, one thread, no ``max_grad_norm`` (the case where the guard computes the
norm itself; with clipping the norm comes with it). CPU time (``time.process_time``), the median of 5
repeats, so that other jobs on a shared machine disturb it less than wall-clock time.

    python benchmarks/bench_guard.py

See benchmarks/README.md ("Divergence guard cost") for the measured numbers.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_cli.ppo.guard import check_update, gradient_norm

SIZES = (("tiny 2x128", 2, 128), ("small 4x256", 4, 256))
VOCAB, BATCH, LENGTH = 546, 16, 32


def cpu_seconds(fn: Callable[[], object], reps: int, repeats: int = 5) -> float:
    """Median CPU seconds of one call of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(reps):
            fn()
        times.append((time.process_time() - start) / reps)
    return statistics.median(times)


def measure(n_layer: int, n_embd: int) -> tuple[int, float, float]:
    """(parameters, guard seconds, forward+backward+Adam seconds) per optimiser step."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=VOCAB, n_positions=64))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))

    def optimiser_step() -> None:
        accelerator.backward(model(ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()

    def guard() -> bool:
        return bool(check_update(accelerator, torch.tensor(1.0), gradient_norm(accelerator, model, None)).skipped)

    step_seconds = cpu_seconds(optimiser_step, reps=20)
    accelerator.backward(model(ids, labels=ids).loss)  # gradients for the guard to check
    return sum(p.numel() for p in model.parameters()), cpu_seconds(guard, reps=300), step_seconds


def main() -> None:
    torch.set_num_threads(1)
    for name, n_layer, n_embd in SIZES:
        params, guard, step = measure(n_layer, n_embd)
        print(f"{name} ({params / 1e6:.2f}M params): guard {guard * 1e3:.3f} ms CPU per optimiser step; "
              f"forward+backward+Adam {step * 1e3:.1f} ms -> {guard / step * 100:.2f} %")


if __name__ == "__main__":
    main()
