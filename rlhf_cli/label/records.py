"""The preference file ``rlhf label`` writes: one JSON object per line, appended and synced per judgement.

Each row is exactly the explicit-prompt format ``rlhf reward`` reads — ``prompt``, ``chosen``,
``rejected`` (strings) and ``tie`` (bool) — plus keys it ignores that say where the judgement came from:

* ``pair_id``: :func:`pair_key` of the pair (order-free), which is how a resumed session knows a pair;
* ``shown``: which response stood on the left and which on the right, e.g. ``["rejected", "chosen"]``
  (so a person's habit of pressing ``1`` can be checked for afterwards); ``key``: the key pressed;
* ``chosen_source`` / ``rejected_source``: the model each response came from (``model``, ``path``,
  ``step``, ``seed``);
* ``time`` (UTC, ISO 8601), ``labeller`` (``--labeller NAME`` or null), and with ``--reward-model``
  ``reward_model_probability`` = the model's P(chosen ≻ rejected), computed before the key was read.

A tie is written with the two responses as chosen/rejected in the order shown and ``tie: true``.

Durability: a row is one ``write`` of a whole line followed by ``flush`` and ``fsync``, so a killed
process or a closed terminal loses at most the pair on screen. Undo truncates the file back to where
the row began (and syncs again). The file is opened only when the first row is written: a session that
fails before that leaves no file, and an existing file is only ever appended to.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.errors import RlhfError

REQUIRED_TEXT_KEYS = ("prompt", "chosen", "rejected")


class LabelError(RlhfError):
    """A problem with what ``rlhf label`` was given (its FILE, SOURCE, models, keys)."""


def pair_key(prompt: str, response_a: str, response_b: str) -> str:
    """A stable id of a pair: the same whichever response is called a or b, and across runs."""
    payload = json.dumps([prompt, sorted([response_a, response_b])], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _foreign(path: Path, line_number: int, problem: str) -> LabelError:
    return LabelError(
        f"--out {path} is not a preference file this command can continue: line {line_number} {problem}. "
        "Every line must be a JSON object with string prompt, chosen and rejected (the format `rlhf label` "
        "writes and `rlhf reward` reads). Give a new file with --out, or repair that line; the file was not changed."
    )


def _check_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _foreign(path, number, f"is not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise _foreign(path, number, f"is a JSON {type(row).__name__}, not an object")
    missing = [key for key in REQUIRED_TEXT_KEYS if not isinstance(row.get(key), str)]
    if missing:
        raise _foreign(path, number, f"has no string {', '.join(missing)}")
    return row


def read_labelled(path: Path) -> list[dict[str, Any]]:
    """The rows already in ``path`` (none if it does not exist); a LabelError for anything else."""
    if not path.exists():
        return []
    if not path.is_file():
        raise LabelError(f"--out {path} is not a file (a directory?). Give the path of a .jsonl file to write.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _foreign(path, 1, "holds bytes that are not UTF-8 text") from None
    except OSError as err:
        raise LabelError(f"--out {path} cannot be read ({err.strerror}). Check its permissions, or give another file.") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(_check_row(path, number, line))
    return rows


def check_writable(path: Path) -> None:
    """Fail before any model loads if ``path`` could never be written (no file is created here)."""
    if path.exists():
        if not os.access(path, os.W_OK):
            raise LabelError(f"--out {path} is not writable. Check its permissions, or give another file.")
        return
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LabelError(f"--out {path} cannot be created: {parent} is not a writable directory. Give another path.")


@dataclass
class LabelFile:
    """Appends rows to the preference file and takes the newest ones back (undo)."""

    path: Path
    # File sizes before each row this session wrote, newest last: where undo truncates to.
    _row_starts: list[int] = field(default_factory=list)

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line, then flush and fsync: it survives a kill from here on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            start = handle.seek(0, os.SEEK_END)
            if start and not self._ends_with_newline():
                line = "\n" + line  # a hand-edited file whose last line lacks its newline
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._row_starts.append(start)

    def remove_last(self) -> None:
        """Undo: cut the newest row this session wrote off the end of the file."""
        start = self._row_starts.pop()
        with open(self.path, "r+b") as handle:
            handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
