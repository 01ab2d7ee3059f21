"""Pre-emption: SIGTERM/SIGINT finish the current step, checkpoint, and exit with a distinct code.

The first signal only records itself; the loop checks after each step (agreeing across processes)
and stops cleanly. A second signal means "now": the process exits at once with 128 + signal number.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any, Optional

from rlhf_cli.errors import RlhfError

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" — what a pre-empted job is.
PREEMPTED_EXIT_CODE = 75


class Preempted(RlhfError):
    """The run stopped on a signal after writing a checkpoint; not a failure of the input."""

    exit_code = PREEMPTED_EXIT_CODE
    label = "Stopped:"


class StopRequest:
    """Records the first SIGTERM/SIGINT while installed; a second one exits immediately."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True) -> None:
        self.received: Optional[int] = None
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # the user insists: no checkpoint, no cleanup
        self.received = signum
        if self._announce:
            name = signal.Signals(signum).name
            sys.stderr.write(
                f"\n{name} received: finishing the current step, then writing a checkpoint "
                f"(send it again to exit at once).\n"
            )
            sys.stderr.flush()

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
