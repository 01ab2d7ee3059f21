"""One writer per run directory: an exclusive ``flock`` on ``<run dir>/.rlhf.lock``.

The kernel releases a ``flock`` when its process dies, so a ``kill -9`` never leaves a stale lock:
a lock file left behind by a killed run is not held by anyone and the next start takes it. The
holder writes its PID, host and start time into the file, only to name itself in the refusal.

A clean release unlinks the file while still holding it (so a finished run leaves nothing behind).
A starter that opened the file just before that unlink then holds a lock on a file no longer in the
directory; it notices (the path's inode is no longer its file's) and tries again on the new file.

Under ``accelerate launch`` the lock is the job's: rank 0 takes it, and every rank gets rank 0's
verdict (:func:`job_lock`), so the others never touch the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf_cli.errors import RlhfError

LOCK_NAME = ".rlhf.lock"


class RunLockedError(RlhfError):
    """Another process holds the run directory."""


@dataclass
class RunLock:
    """A held lock (``fd`` is None on the ranks that do not hold the file themselves)."""

    path: Path
    fd: Optional[int] = None
    created_root: Optional[Path] = None  # the outermost directory that acquiring created

    def release(self) -> None:
        """Unlink the file (still holding it), then close it; remove directories that acquiring
        created if they are still empty (a start that failed)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        _remove_empty(self.path.parent, self.created_root)


def acquire(root: Path, *, command: str = "rlhf train") -> RunLock:
    """Take the lock of the run directory ``root`` (created if missing), or raise RunLockedError."""
    root = Path(root)
    created_root = _outermost_missing(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            _remove_empty(root, created_root)
            raise RunLockedError(_refusal(root, holder, command)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder released and unlinked it between our open and flock: take the new file
    _write_holder(fd, command)
    return RunLock(path, fd, created_root)


def job_lock(root: Path, *, is_main: bool, num_processes: int, command: str = "rlhf train") -> RunLock:
    """The lock of a (possibly multi-process) job: rank 0 acquires; every rank raises rank 0's refusal."""
    if num_processes == 1:
        return acquire(root, command=command)
    from accelerate.utils import broadcast_object_list

    lock, verdict = RunLock(Path(root) / LOCK_NAME), [None]
    if is_main:
        try:
            lock = acquire(root, command=command)
        except RunLockedError as err:
            verdict = [str(err)]
    broadcast_object_list(verdict, from_process=0)
    if verdict[0] is not None:
        refusal = RunLockedError(verdict[0])
        refusal.quiet = not is_main  # rank 0 prints it
        raise refusal
    return lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write_holder(fd: int, command: str) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}  # the holder is between taking the lock and writing its name


def _refusal(root: Path, holder: dict, command: str) -> str:
    who = (f"{holder.get('command', 'a run')} (PID {holder['pid']} on {holder.get('host', '?')}, since {holder.get('since', '?')})"
           if "pid" in holder else "another process that is just starting")
    return (
        f"{root} is in use by {who}; `{command}` would write there at the same time. Wait for it to finish "
        f"(or stop it: a stopped run releases the directory at once, even after kill -9), then run this again; "
        f"to run beside it, choose another output_dir."
    )


def _outermost_missing(path: Path) -> Optional[Path]:
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_empty(path: Path, created_root: Optional[Path]) -> None:
    """Remove ``path`` and its parents up to ``created_root`` while they are empty."""
    if created_root is None:
        return
    while path.is_relative_to(created_root):
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent
