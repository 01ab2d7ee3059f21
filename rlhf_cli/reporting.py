"""What a run reports: the rank-0 console (rich), metrics.jsonl, and Accelerate trackers.

Only the main process writes; every other rank gets a reporter that does nothing, so callers
never branch on the rank themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# The few numbers worth a glance on every line (key, label, format); the rest goes to
# metrics.jsonl and trackers. Kept under 80 columns so a plain terminal does not wrap it.
HEADLINE = (
    ("env/reward_mean", "reward", "{:+.3f}"),
    ("objective/kl", "kl", "{:.3f}"),
    ("objective/kl_coef", "β", "{:.3f}"),
    ("ppo/loss/kl", "kl-loss", "{:.2f}"),  # only with a KL loss term (ppo.kl_loss_coef > 0), in β's place
    ("ppo/loss/total", "loss", "{:+.3f}"),
    ("ppo/policy/clipfrac", "clip", "{:.2f}"),
)


def _shown(key: str, stats: dict[str, Any]) -> bool:
    """Whether a HEADLINE entry is on the line: present, and not a β of 0 beside a KL loss term (the KL
    is then in the loss, not the reward; the line stays under 80 columns)."""
    if key == "objective/kl_coef" and "ppo/loss/kl" in stats:
        return float(stats.get(key, 0.0)) != 0.0
    return key in stats


def _fmt(value: float) -> str:
    if value == 0 or (1e-3 <= abs(value) < 1e4):
        return f"{value:.3f}"
    return f"{value:.2e}"


# The field of a metrics line that lists its keys whose value was NaN or ±inf (written as null).
NONFINITE_FIELD = "nonfinite_keys"


def json_safe(stats: dict[str, Any]) -> dict[str, Any]:
    """Scalars only; NaN/inf become null so every line is strict JSON, and their keys are listed under
    :data:`NONFINITE_FIELD` so that a null always says why it is there."""
    out: dict[str, Any] = {}
    nonfinite = []
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = value if math.isfinite(value) else None
        if out[key] is None:
            nonfinite.append(key)
    if nonfinite:
        out[NONFINITE_FIELD] = nonfinite
    return out


def metrics_line(step: int, stats: dict[str, Any]) -> str:
    """One line of metrics.jsonl (newline included)."""
    return json.dumps({"step": step, **json_safe(stats)}, sort_keys=False) + "\n"


def tracker_logs(
    scalars: dict[str, float], batch: dict[str, Sequence[Any]], rewards: Sequence[float], columns: Sequence[str] = ("query", "response")
) -> dict[str, Any]:
    """What a step sends to the Accelerate trackers: its scalar stats plus a ``game_log`` markdown
    table of the ``columns`` of ``batch`` with each row's reward (``rewards`` may run longer: zip stops)."""
    logs: dict[str, Any] = dict(scalars)
    shown = [c for c in columns if c in batch]
    if shown:
        header = "| " + " | ".join([*shown, "reward"]) + " |\n|" + "---|" * (len(shown) + 1) + "\n"
        rows = zip(*[batch[c] for c in shown], rewards)
        logs["game_log"] = header + "".join("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |\n" for row in rows)
    return logs


class MetricsFile:
    """metrics.jsonl: one JSON object per step, appended and flushed as the run goes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, step: int, stats: dict[str, Any]) -> None:
        self.append(metrics_line(step, stats))

    def append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)


class Reporter:
    """Rank-0 console output: a progress bar with live reward/KL, stats lines and sample tables."""

    def __init__(
        self,
        *,
        total_steps: int,
        enabled: bool,
        progress: bool,
        console: Optional[Console] = None,
        label: str = "PPO",
        headline: Sequence[tuple[str, str, str]] = HEADLINE,
    ) -> None:
        """``label`` names the bar; ``headline`` (key, label, format) lists the numbers of each stats
        line, and its first two are the bar's live numbers (rlhf reward passes its own)."""
        self.enabled = enabled
        self.headline = tuple(headline)
        self.console = console or Console(stderr=False, highlight=False)
        self._progress: Optional[Progress] = None
        self._task = None
        if enabled and progress:
            self._progress = Progress(
                TextColumn(f"[bold]{label}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[live]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, live="")

    def __enter__(self) -> "Reporter":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def print(self, *objects: Any) -> None:
        if self.enabled:
            self.console.print(*objects)

    def advance(self, step: int, stats: dict[str, Any]) -> None:
        """Move the bar to ``step`` (1-based count of finished steps) and refresh the live numbers."""
        if self._progress is None:
            return
        live = "  ".join(f"{label} {_fmt(stats.get(key, float('nan')))}" for key, label, _ in self.headline[:2])
        self._progress.update(self._task, completed=step, live=live)

    def stats_line(self, step: int, stats: dict[str, Any]) -> None:
        parts = [f"{label} {fmt.format(float(stats[key]))}" for key, label, fmt in self.headline if _shown(key, stats)]
        if "time/step" in stats:
            parts.append(f"{float(stats['time/step']):.2f} s")
        self.print(f"[dim]step {step:>4}[/]  " + "  ".join(parts))

    def sample_table(self, title: str, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float]) -> None:
        table = Table(title=title, show_lines=False, expand=True)
        table.add_column("prompt", ratio=2, overflow="fold")
        table.add_column("response", ratio=3, overflow="fold")
        table.add_column("reward", justify="right", no_wrap=True)
        for prompt, response, reward in zip(prompts, responses, rewards):
            table.add_row(prompt, response, f"{reward:+.3f}")
        self.print(table)
