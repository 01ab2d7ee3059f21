"""Single keys from the person's terminal, or replayed from a ``--script`` file.

The terminal is put in cbreak mode (each key arrives as pressed, without Enter, and is not echoed;
Ctrl-C still interrupts) for the session only, and restored however the session ends.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Protocol

from rlhf_cli.label.records import LabelError

QUIT = "q"
# Ctrl-D and Ctrl-C as bytes (cbreak mode delivers Ctrl-D as a byte rather than end-of-file).
_END_BYTES = ("\x04", "\x03")


class KeySource(Protocol):
    """Where the session reads its keys: one lower-case character per call, :data:`QUIT` at the end."""

    def read(self) -> str: ...


class TerminalKeys:
    """Keys pressed in the terminal on stdin, one at a time (a context manager: cbreak mode inside)."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self._saved: Optional[list] = None

    def __enter__(self) -> "TerminalKeys":
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self) -> str:
        data = os.read(self.fd, 1)
        if not data or data.decode("latin-1") in _END_BYTES:  # the terminal closed, or Ctrl-D
            return QUIT
        return data.decode("latin-1").lower()


class ScriptKeys:
    """Keys replayed from a file: every non-blank character is a key press, ``#`` starts a comment to
    the end of its line; after the last key the session quits."""

    def __init__(self, path: str | Path) -> None:
        self._keys: Iterator[str] = iter(read_script(path))

    def __enter__(self) -> "ScriptKeys":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> str:
        return next(self._keys, QUIT).lower()


def read_script(path: str | Path) -> list[str]:
    """The keys of a ``--script`` file."""
    given = Path(path).expanduser()
    try:
        text = given.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LabelError(f"--script {given} cannot be read ({err}). Give a text file of keys, e.g. '1 2 t s u q'.") from None
    keys = []
    for line in text.splitlines():
        keys.extend(char for char in line.split("#", 1)[0] if not char.isspace())
    return keys


def require_terminal() -> None:
    """A LabelError unless stdin is a terminal (a pipe or CI cannot press keys)."""
    if not sys.stdin.isatty():
        raise LabelError(
            "`rlhf label` reads your judgements as single key presses, but stdin is not a terminal (a pipe, a "
            "redirect or CI). Run it in an interactive terminal, or replay keys from a file with --script FILE "
            "(e.g. a file holding '1 2 t s u q')."
        )
