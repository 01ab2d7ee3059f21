"""Wall-clock seconds per named phase: the one timer of a step (trainer and training loop alike)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class PhaseTimer:
    """Accumulates ``time.perf_counter`` seconds per phase name: ``with timer("forward_pass"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since the timer was created."""
        return time.perf_counter() - self.start
