"""What every ``rlhf`` subcommand prints the same way: the program's name and one-paragraph errors."""

from __future__ import annotations

PROG = "rlhf"


def print_error(message: object, *, prefix: str = "Error:") -> None:
    """One paragraph on stderr, with a red prefix; rich must not hard-wrap it or read it as markup."""
    from rich.console import Console
    from rich.text import Text

    text = Text(f"{prefix} ", style="bold red")
    text.append(" ".join(str(message).split()))
    Console(stderr=True).print(text, soft_wrap=True)
