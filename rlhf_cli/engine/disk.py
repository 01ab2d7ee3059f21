"""A full disk (or any failed write) is one paragraph, not a traceback, and leaves nothing half-written.

Every write of a run's outputs (a checkpoint, ``final/``, a metrics.jsonl line, report.md and
curves.png) goes through :func:`guarded_write`: an ``OSError`` (ENOSPC, EDQUOT, EIO, a read-only
mount...) removes what that write had started, and becomes a :class:`WriteError` naming the file,
the free space left and roughly what the write needed. Earlier checkpoints are never touched, so the
run continues from the newest complete one once space is freed. Writers that report a full disk as
another type (``torch.save`` raises RuntimeError from its zip writer, safetensors its own error) are
taken for a full disk too, but only when the filesystem really is short of what was needed.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from rlhf_cli.errors import RlhfError


class WriteError(RlhfError):
    """A run's output could not be written (most often: the disk is full)."""


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human(size: Optional[float]) -> str:
    if size is None:
        return "an unknown amount"
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@contextmanager
def guarded_write(
    target: Path,
    what: str,
    *,
    needed: Optional[int],
    undo: Callable[[], None],
    advice: Union[str, Callable[[], str]],
) -> Iterator[None]:
    """Run the block that writes ``target`` (``what`` names it for the user); on a failed write, call
    ``undo`` (remove what it half-wrote) and raise a WriteError ending with ``advice`` (a callable is
    called only then: a write that succeeds costs nothing)."""
    try:
        yield
    except OSError as err:
        undo()
        raise WriteError(_message(target, what, err, needed, advice)) from err
    except Exception as err:  # torch.save's RuntimeError, safetensors' error: a full disk only if it is full
        free = free_bytes(target)
        if needed is None or free is None or free >= needed:
            raise
        undo()
        raise WriteError(_message(target, what, err, needed, advice)) from err


def _message(target: Path, what: str, err: BaseException, needed: Optional[int], advice: Union[str, Callable[[], str]]) -> str:
    advice = advice() if callable(advice) else advice
    filename = getattr(err, "filename", None) or target
    reason = os.strerror(err.errno) if getattr(err, "errno", None) else str(err).splitlines()[0][:200]
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        needed is not None and (free_bytes(target) or 0) < needed
    )
    cause = "the disk is full" if full else "the write failed"
    return (
        f"Could not write {what} ({filename}): {cause} ({reason}). {human(free_bytes(target))} free on that "
        f"filesystem; {what} needs about {human(needed)}. What this write had started was removed. {advice}"
    )


def remove_tree(path: Path) -> Callable[[], None]:
    """An ``undo`` that deletes the directory (or file) ``path`` if it exists."""

    def undo() -> None:
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif Path(path).exists():
            Path(path).unlink()

    return undo


def truncate_to(path: Path, size: int) -> Callable[[], None]:
    """An ``undo`` that cuts the file ``path`` back to ``size`` bytes (a torn appended line)."""

    def undo() -> None:
        try:
            with open(path, "r+b") as handle:
                handle.truncate(size)
        except OSError:
            pass

    return undo
