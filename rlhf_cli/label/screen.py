"""What the person sees: the prompt, the two responses side by side (wrapped), where they are in the
session, and what the last key did. Model text is shown as plain text (never read as rich markup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rlhf_cli.label.pairs import ShownPair

KEY_HELP = "1: left is better · 2: right is better · t: tie · s: skip · u: undo · q: quit"


@dataclass(frozen=True)
class Progress:
    """The counters in the header: this pair's position among the session's pairs, and rows in the file."""

    position: int  # 1-based, among the pairs of this session (already answered + this one)
    total: int  # pairs of this session (answered, on screen and still to come)
    labelled: int  # judgements in the file (earlier sessions included)
    this_session: int  # judgements written by this session


def pair_screen(shown: ShownPair, progress: Progress, *, status: str = "", agreement: str = "") -> Group:
    """The screen for one pair."""
    header = Text.assemble(
        ("rlhf label", "bold"),
        f"   pair {progress.position} of {progress.total}   ·   labelled {progress.labelled}",
        f" ({progress.this_session} this session)",
    )
    responses = Table(expand=True, show_lines=False, box=None, padding=(0, 2))
    responses.add_column(Text("1  (left)", style="bold cyan"), ratio=1, overflow="fold")
    responses.add_column(Text("2  (right)", style="bold magenta"), ratio=1, overflow="fold")
    responses.add_row(Text(shown.left), Text(shown.right))
    parts = [
        header,
        Panel(Text(shown.pair.prompt), title="prompt", title_align="left"),
        Panel(responses, title="which continuation is better?", title_align="left"),
        Text(KEY_HELP, style="dim"),
    ]
    parts += [Text(line) for line in (status, agreement) if line]
    return Group(*parts)


def end_screen(message: str, *, status: str = "", agreement: str = "") -> Group:
    """The screen once no pair is left: what was done, and the keys still accepted."""
    parts = [Text(line) for line in (status, agreement) if line]
    parts += [Text(message, style="bold"), Text("[u] undo the last answer   any other key: finish", style="dim")]
    return Group(*parts)


def show(console: Console, screen: Group) -> None:
    """Replace the terminal's screen with ``screen`` (a script's output just gets each screen in turn)."""
    if console.is_terminal:
        console.clear()
    console.print(screen)


def session_summary(written: int, labelled: int, skipped: int, remaining: int, out: str,
                    agreement: Optional[str] = None) -> str:
    """The line printed when the session ends."""
    lines = [f"{written} judgements written this session; {labelled} in {out}; {skipped} skipped; {remaining} pairs not shown yet."]
    if agreement:
        lines.append(agreement)
    if remaining or skipped:
        lines.append("Run the same command again to continue: labelled pairs are never shown again.")
    return "\n".join(lines)
