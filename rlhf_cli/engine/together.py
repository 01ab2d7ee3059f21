"""Processes of one job fail together: one rank's exception stops every rank, and is printed once.

A phase that can raise on some ranks only (the reward on its own share of a batch, generation running
out of memory on one GPU, a file one rank reads) is run through :func:`agreed`: afterwards every rank
all-reduces one flag per rank (a single small collective), so either all go on or all raise. The
lowest failing rank raises its own exception (the CLI prints it); every other rank raises
:class:`PeerFailed`, which the CLI does not print. No rank is left waiting at the next collective.

Inside ``PPOEngine.step`` the collectives are interleaved with the work, so a failure there cannot
be agreed on without a check at each of them. There the failing rank's exception ends its process,
and the launcher (torchrun) stops the others; a collective that sees its peer gone is turned into a
quiet :class:`PeerFailed` by :func:`quiet_when_peer_died` instead of a second traceback.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
from accelerate import PartialState

from rlhf_cli.errors import RlhfError

T = TypeVar("T")

# What gloo and NCCL say when the process at the other end of a collective is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "NCCL communicator was aborted")


class PeerFailed(RlhfError):
    """Another process of the job failed and printed why; this one stops without a message."""

    quiet = True


def agreed(state: PartialState, phase: Callable[[], T]) -> T:
    """``phase()``, with every rank learning whether any rank's ``phase`` raised (one all-reduce)."""
    if state.num_processes == 1:
        return phase()
    error, result = None, None
    try:
        result = phase()
    except Exception as err:  # every kind: a bug or an OOM on one rank must not strand the others
        error = err
    agree(state, error)
    return result


def agree(state: PartialState, error: Optional[BaseException], flag: bool = False) -> bool:
    """One all-reduce of one flag per rank, plus ``flag``: raises ``error`` on the lowest rank that had
    one (and PeerFailed on the others) if any had; otherwise returns whether any rank set ``flag``."""
    if state.num_processes == 1:
        if error is not None:
            raise error
        return flag
    flags = torch.zeros(state.num_processes + 1, device=state.device)
    flags[state.process_index] = float(error is not None)
    flags[-1] = float(flag)
    torch.distributed.all_reduce(flags)
    values = flags.tolist()
    failed = [rank for rank, value in enumerate(values[:-1]) if value > 0]
    if not failed:
        return values[-1] > 0
    if error is not None and failed[0] == state.process_index:
        if isinstance(error, RlhfError):
            error.quiet = False  # this process speaks for the job, even if every rank found the same
        raise error
    raise PeerFailed(f"process {failed[0]} failed (its message is printed by that process)") from error


def quiet_when_peer_died(state: PartialState, phase: Callable[[], T]) -> T:
    """``phase()``; a collective that failed because another process died becomes :class:`PeerFailed`."""
    try:
        return phase()
    except RuntimeError as err:
        if state.num_processes > 1 and any(text in str(err) for text in _PEER_GONE):
            raise PeerFailed(f"another process died during a collective ({err})") from err
        raise
