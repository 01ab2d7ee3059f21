"""Before/after comparison on held-out prompts, and the training curves.

"Before" is the reference model (the frozen initial policy), "after" the trained policy. Both
generate under a forked, fixed-seed RNG so the report never perturbs the training stream and two
runs with the same seed print the same table. One sample per prompt: the means come with their
standard errors over prompts, and the change with the standard error of the paired differences
(the same prompts on both sides, so prompt-to-prompt spread cancels).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf_cli.rewards import RewardFunction, score_responses
from rlhf_cli.rollout.generation import generate_responses
from rlhf_cli.summary_stats import standard_error


@dataclass
class Comparison:
    """Rows of the before/after table and their means."""

    prompts: list[str]
    before: list[str]
    before_rewards: list[float]
    after: list[str]
    after_rewards: list[float]

    @property
    def mean_before(self) -> float:
        return sum(self.before_rewards) / max(1, len(self.before_rewards))

    @property
    def mean_after(self) -> float:
        return sum(self.after_rewards) / max(1, len(self.after_rewards))

    @property
    def se_before(self) -> float:
        return standard_error(self.before_rewards)

    @property
    def se_after(self) -> float:
        return standard_error(self.after_rewards)

    @property
    def mean_change(self) -> float:
        return self.mean_after - self.mean_before

    @property
    def se_change(self) -> float:
        """Standard error of the mean paired difference (after - before, prompt by prompt)."""
        return standard_error([after - before for before, after in zip(self.before_rewards, self.after_rewards)])

    def summary(self) -> str:
        """One line: both means with their standard errors, the change, and what they are over."""
        return (
            f"held-out mean reward {self.mean_before:+.3f} ± {self.se_before:.3f} before → {self.mean_after:+.3f} ± "
            f"{self.se_after:.3f} after (change {self.mean_change:+.3f} ± {self.se_change:.3f}; ± one standard error, "
            f"{len(self.prompts)} prompts, one sample each)"
        )


def _respond(model: nn.Module, prompt_ids: list[Tensor], *, seed: int, tokenizer, generation: dict, device) -> list[str]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses = generate_responses(model, prompt_ids, device=device, **generation)
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def compare_before_after(
    *,
    before_model: nn.Module,
    after_model: nn.Module,
    prompt_ids: list[Tensor],
    prompts: list[str],
    tokenizer,
    reward_fn: RewardFunction,
    generation: dict,
    seed: int,
    device,
) -> Comparison:
    """Generate from both models on the same prompts with the same seed and score both."""
    before = _respond(before_model, prompt_ids, seed=seed, tokenizer=tokenizer, generation=generation, device=device)
    after = _respond(after_model, prompt_ids, seed=seed, tokenizer=tokenizer, generation=generation, device=device)
    return Comparison(
        prompts=prompts,
        before=before,
        before_rewards=score_responses(reward_fn, prompts, before).tolist(),
        after=after,
        after_rewards=score_responses(reward_fn, prompts, after).tolist(),
    )


CONSOLE_ROWS = 8  # rows of the console table; report.md lists every prompt
# metrics.jsonl prefix of the independent judges (reward.monitor=[...]): logged, never optimised
MONITOR_PREFIX = "env/monitor/"


def summary_lines(comparison: "Comparison | None", reward_means: list[float], run_root: Path) -> list:
    """What the console shows at the end of a run: the before/after table, the first and last mean
    rewards, and where the run directory is."""
    lines: list = [comparison_table(comparison)] if comparison is not None else []
    window = max(1, min(5, len(reward_means) // 4))
    if len(reward_means) >= 2 * window:
        first = sum(reward_means[:window]) / window
        last = sum(reward_means[-window:]) / window
        lines.append(f"mean reward: first {window} steps {first:+.3f} → last {window} steps {last:+.3f}")
    lines.append(f"run directory: [bold]{run_root}[/]  (config.yaml, metrics.jsonl, final/, report.md, curves.png)")
    return lines


def comparison_table(comparison: Comparison, rows: int = CONSOLE_ROWS):
    """The first ``rows`` prompts of the before/after comparison as a rich table; the means are over all of them."""
    from rich.table import Table

    shown = min(rows, len(comparison.prompts))
    hidden = len(comparison.prompts) - shown
    more = f" ({hidden} more rows in report.md)" if hidden else ""
    table = Table(title="before / after training (held-out prompts)", caption=comparison.summary() + more, expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("before", ratio=3, overflow="fold")
    table.add_column("reward", justify="right", no_wrap=True)
    table.add_column("after", ratio=3, overflow="fold")
    table.add_column("reward", justify="right", no_wrap=True)
    columns = zip(comparison.prompts, comparison.before, comparison.before_rewards, comparison.after, comparison.after_rewards)
    for prompt, before, r_before, after, r_after in list(columns)[:shown]:
        table.add_row(prompt, before, f"{r_before:+.3f}", after, f"{r_after:+.3f}")
    table.add_row(
        "[bold]mean ± SE[/]",
        "",
        f"[bold]{comparison.mean_before:+.3f} ± {comparison.se_before:.3f}[/]",
        "",
        f"[bold]{comparison.mean_after:+.3f} ± {comparison.se_after:.3f}[/]",
    )
    return table


def _cell(text: str) -> str:
    """Markdown table cell: one line, no pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def report_markdown(comparison: Comparison, *, title: str, reward_means: list[float]) -> str:
    """The before/after table (and the training reward trend) as Markdown."""
    lines = [f"# {title}", ""]
    if reward_means:
        window = max(1, min(5, len(reward_means) // 4))
        first = sum(reward_means[:window]) / window
        last = sum(reward_means[-window:]) / window
        lines += [
            f"Training: {len(reward_means)} steps; mean reward over the first {window} steps {first:+.4f}, "
            f"over the last {window} steps {last:+.4f}.",
            "",
        ]
    count = len(comparison.prompts)
    lines += [
        f"Held-out reward over {count} held-out prompts, one sample per prompt and model (± one standard error of the mean):",
        "",
        f"- before: **{comparison.mean_before:+.4f} ± {comparison.se_before:.4f}**",
        f"- after: **{comparison.mean_after:+.4f} ± {comparison.se_after:.4f}**",
        f"- change (paired, prompt by prompt): **{comparison.mean_change:+.4f} ± {comparison.se_change:.4f}**",
        "",
        "*Before* is the initial policy (the frozen reference), *after* the trained policy, "
        "both sampled with the same seed and generation settings.",
        "",
        "| prompt | response before | reward before | response after | reward after |",
        "|---|---|---:|---|---:|",
    ]
    rows = zip(comparison.prompts, comparison.before, comparison.before_rewards, comparison.after, comparison.after_rewards)
    for prompt, before, r_before, after, r_after in rows:
        lines.append(f"| {_cell(prompt)} | {_cell(before)} | {r_before:+.4f} | {_cell(after)} | {r_after:+.4f} |")
    lines.append(
        f"| **mean ± SE** | | **{comparison.mean_before:+.4f} ± {comparison.se_before:.4f}** | "
        f"| **{comparison.mean_after:+.4f} ± {comparison.se_after:.4f}** |"
    )
    return "\n".join(lines) + "\n"


def smoothed(values: list[float], window: int) -> list[float]:
    """Centred moving average of ``values`` over ``window`` points (fewer at the ends, where the window is cut)."""
    half = window // 2
    out = []
    for index in range(len(values)):
        part = values[max(0, index - half) : index + half + 1]
        out.append(sum(part) / len(part))
    return out


def smoothing_window(steps: int) -> int:
    """An odd window of about a tenth of the run (1 for runs under 10 steps: nothing to smooth)."""
    return max(1, (steps // 10) | 1)


def plot_curves(metrics_path: Path, out_path: Path, panels: list[tuple[str, str]] | None = None) -> None:
    """The figure of :func:`curves_figure` for the rows of ``metrics_path`` (metrics.jsonl), saved as a PNG.
    ``panels``: (metric, title) of each panel; None: PPO's (reward, KL, KL coefficient or KL loss)."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    figure = curves_figure(rows, panels)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def _curve_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """(metric, title) of each panel: reward, KL, and what keeps the policy near the reference — the
    reward's KL coefficient β, the KL loss term (ppo.kl_loss_coef > 0), or both."""
    panels = [
        ("env/reward_mean", "reward per step (mean ± std of samples)"),
        ("objective/kl", "KL to the reference (nats / sample)"),
    ]
    kl_in_reward = any(float(row.get("objective/kl_coef", 0.0)) != 0.0 for row in rows)
    kl_loss = any("ppo/loss/kl" in row for row in rows)
    if kl_in_reward or not kl_loss:
        panels.append(("objective/kl_coef", "KL coefficient β"))
    if kl_loss:
        panels.append(("ppo/loss/kl", "KL loss term (mean per token)"))
    return panels + _monitor_panels(rows)


def _monitor_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """One panel per independent judge (``reward.monitor=[...]``) found in metrics.jsonl rows."""
    keys = sorted({key for row in rows for key in row if key.startswith(MONITOR_PREFIX)})
    return [(key, f"monitor {key[len(MONITOR_PREFIX):-len('_mean')]} (not optimised)") for key in keys]


def curves_figure(rows: list[dict], panels: list[tuple[str, str]] | None = None):
    """Reward (with its per-step spread), KL and KL coefficient (or KL loss term) against step, one panel each.

    Each panel shows the raw per-step values as points and a centred moving average as a line; the
    reward panel also shades mean ± std of the step's samples (``env/reward_std``).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    window = smoothing_window(len(rows))
    panels = panels or _curve_panels(rows)
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), constrained_layout=True)
    for axis, (key, title) in zip(axes, panels):
        values = [float(row.get(key, math.nan)) for row in rows]
        if key == "env/reward_mean" and all("env/reward_std" in row for row in rows):
            spread = [float(row["env/reward_std"]) for row in rows]
            lower = [mean - std for mean, std in zip(values, spread)]
            upper = [mean + std for mean, std in zip(values, spread)]
            axis.fill_between(steps, lower, upper, color="C0", alpha=0.15, linewidth=0, label="± std of the step's samples")
        axis.plot(steps, values, ".", color="C0", alpha=0.5, markersize=4, label="per step")
        if window > 1:
            axis.plot(steps, smoothed(values, window), "-", color="C3", linewidth=2, label=f"moving average ({window} steps)")
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    return figure
