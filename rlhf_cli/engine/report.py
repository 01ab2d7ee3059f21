"""Before/after comparison on held-out prompts.

"Before" is the reference model (the frozen initial policy), "after" the trained policy. Both
generate under a forked, fixed-seed RNG so the report never perturbs the training stream and two
runs with the same seed print the same table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf_cli.rewards import RewardFunction, score_responses
from rlhf_cli.rollout.generation import generate_responses


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


def comparison_table(comparison: Comparison):
    """The before/after comparison as a rich table for the console."""
    from rich.table import Table

    table = Table(title="before / after training (held-out prompts)", expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("before", ratio=3, overflow="fold")
    table.add_column("reward", justify="right", no_wrap=True)
    table.add_column("after", ratio=3, overflow="fold")
    table.add_column("reward", justify="right", no_wrap=True)
    rows = zip(comparison.prompts, comparison.before, comparison.before_rewards, comparison.after, comparison.after_rewards)
    for prompt, before, r_before, after, r_after in rows:
        table.add_row(prompt, before, f"{r_before:+.3f}", after, f"{r_after:+.3f}")
    table.add_row("[bold]mean[/]", "", f"[bold]{comparison.mean_before:+.3f}[/]", "", f"[bold]{comparison.mean_after:+.3f}[/]")
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
    lines += [
        "Held-out prompts; *before* is the initial policy (the frozen reference), *after* the trained policy, "
        "both sampled with the same seed and generation settings.",
        "",
        "| prompt | response before | reward before | response after | reward after |",
        "|---|---|---:|---|---:|",
    ]
    rows = zip(comparison.prompts, comparison.before, comparison.before_rewards, comparison.after, comparison.after_rewards)
    for prompt, before, r_before, after, r_after in rows:
        lines.append(f"| {_cell(prompt)} | {_cell(before)} | {r_before:+.4f} | {_cell(after)} | {r_after:+.4f} |")
    lines.append(f"| **mean** | | **{comparison.mean_before:+.4f}** | | **{comparison.mean_after:+.4f}** |")
    return "\n".join(lines) + "\n"


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Reward, KL and KL coefficient against step, from metrics.jsonl, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [row["step"] for row in rows]
    panels = (("env/reward_mean", "mean reward"), ("objective/kl", "KL (nats / sample)"), ("objective/kl_coef", "KL coefficient β"))
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 3.5), constrained_layout=True)
    for axis, (key, label) in zip(axes, panels):
        axis.plot(steps, [row.get(key) for row in rows], marker="." if len(rows) < 50 else None)
        axis.set_xlabel("step")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
