"""The labelling loop: show a pair, read a key, write or take back a judgement.

Keys: ``1`` / ``2`` (the left / right response is better), ``t`` (tie), ``s`` (skip: nothing is
written and the pair comes back in a later session), ``u`` (undo: take back the last answer of this
session, a judgement or a skip, and show that pair again), ``q`` (quit). Any other key is ignored with
a reminder. Once every pair is answered the session waits for one more key, so the last judgement can
still be undone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from rich.console import Console

from rlhf_cli.label.keys import QUIT, KeySource
from rlhf_cli.label.pairs import JUDGEMENT_KEYS, ShownPair, judgement_row
from rlhf_cli.label.records import LabelFile
from rlhf_cli.label.screen import Progress, end_screen, pair_screen, show
from rlhf_cli.label.selection import Agreement

SKIP, UNDO = "s", "u"
_VERDICTS = {"1": "left is better", "2": "right is better", "t": "tie"}


@dataclass
class Answer:
    """One answer of this session, for undo: the pair, and whether a row was written for it."""

    shown: ShownPair
    written: bool
    counted_in_agreement: bool = False


@dataclass
class SessionResult:
    written: int
    skipped: int
    remaining: int


@dataclass
class LabelSession:
    """The pairs still to show (in order), the file, and what this session has answered."""

    pending: deque[ShownPair]
    file: LabelFile
    labelled_before: int
    labeller: Optional[str] = None
    agreement: Optional[Agreement] = None
    answers: list[Answer] = field(default_factory=list)
    status: str = ""

    @property
    def written(self) -> int:
        return sum(answer.written for answer in self.answers)

    def progress(self) -> Progress:
        total = len(self.answers) + len(self.pending)
        return Progress(len(self.answers) + 1, total, self.labelled_before + self.written, self.written)

    def run(self, keys: KeySource, console: Console) -> SessionResult:
        """Answer pairs until ``q``, the end of the keys, or (after the last pair) one more key."""
        try:
            while self._step(keys.read() if self._render(console) else QUIT, console):
                pass
        except KeyboardInterrupt:  # Ctrl-C: every answer so far is on disk already
            pass
        skipped = sum(not answer.written for answer in self.answers)
        return SessionResult(self.written, skipped, len(self.pending))

    def _render(self, console: Console) -> bool:
        agreement = self.agreement.summary() if self.agreement is not None else ""
        if self.pending:
            show(console, pair_screen(self.pending[0], self.progress(), status=self.status, agreement=agreement))
        elif self.answers:
            show(console, end_screen("Every pair of this session is answered.", status=self.status, agreement=agreement))
        else:
            return False  # nothing to show and nothing to undo
        return True

    def _step(self, key: str, console: Console) -> bool:
        """Act on ``key``; False when the session is over."""
        if key == UNDO:
            self._undo()
            return True
        if not self.pending or key == QUIT:
            return False
        if key in JUDGEMENT_KEYS:
            self._judge(key)
        elif key == SKIP:
            self.answers.append(Answer(self.pending.popleft(), written=False))
            self.status = "skipped (it will come back in a later session)"
        else:
            self.status = f"'{key if key.isprintable() else repr(key)}' is not a key of this screen: press 1, 2, t, s, u or q."
        return True

    def _judge(self, key: str) -> None:
        shown = self.pending.popleft()
        row = judgement_row(shown, key, labeller=self.labeller)
        self.file.append(row)
        counted = self.agreement is not None and "reward_model_probability" in row and not row["tie"]
        if counted:
            self.agreement.add(row["reward_model_probability"])
        self.answers.append(Answer(shown, written=True, counted_in_agreement=counted))
        self.status = f"recorded: {_VERDICTS[key]}" + _model_view(row)

    def _undo(self) -> None:
        if not self.answers:
            self.status = "nothing to undo in this session"
            return
        answer = self.answers.pop()
        if answer.written:
            self.file.remove_last()
        if answer.counted_in_agreement:
            self.agreement.remove_last()
        self.pending.appendleft(answer.shown)
        self.status = "undone: the previous pair is back" + (" and its row removed from the file" if answer.written else "")


def _model_view(row: dict) -> str:
    """After a judgement: what the reward model predicted for it (never shown before the key is read)."""
    probability = row.get("reward_model_probability")
    if probability is None:
        return ""
    if row["tie"]:
        return f" (reward model: P(left ≻ right) = {probability:.2f})"
    return f" (reward model: P(your choice) = {probability:.2f})"
