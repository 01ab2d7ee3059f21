"""Monitor rewards (``reward.monitor=[...]``): scored and logged, never optimised.

Each monitor is any source of the reward group (vader, classifier, callable, learned). Its mean over a
step's responses (all processes) is logged as ``env/monitor/<name>_mean``, and report.md gets its
held-out mean before and after training. They are computed after the PPO step from the rollout's texts
and handed to nothing else, so they cannot enter the advantages: a user sees whether optimising the
(perhaps learned) reward also raises an independent judge, or whether the policy games the proxy.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_cli.engine.report import MONITOR_PREFIX, Comparison
from rlhf_cli.rewards import RewardFunction, score_responses
from rlhf_cli.summary_stats import standard_error


def build_monitors(sources: Sequence[Any]) -> dict[str, RewardFunction]:
    """Name -> reward function for each ``reward.monitor`` entry (names: the type, numbered on repeats)."""
    from rlhf_cli.rewards.factory import build_reward_source

    monitors: dict[str, RewardFunction] = {}
    for index, source in enumerate(sources):
        name = str(source.type)
        if name in monitors:
            name = f"{name}_{index}"
        monitors[name] = build_reward_source(source, f"reward.monitor[{index}]")
    return monitors


def monitor_scores(monitors: dict[str, RewardFunction], prompts: list[str], texts: list[str]) -> dict[str, torch.Tensor]:
    """Each monitor's scores of this process's responses of the step (no collective: the caller agrees
    on a failure before :func:`monitor_stats` gathers)."""
    return {name: score_responses(fn, prompts, texts) for name, fn in monitors.items()}


def monitor_stats(scores: dict[str, torch.Tensor], accelerator: Any) -> dict[str, float]:
    """``env/monitor/<name>_mean`` over every process's responses of the step."""
    return {f"{MONITOR_PREFIX}{name}_mean": float(accelerator.gather(values.to(accelerator.device)).mean())
            for name, values in scores.items()}


def heldout_monitor_lines(monitors: dict[str, RewardFunction], comparison: Comparison) -> list[str]:
    """One line per monitor: its held-out mean ± SE before and after, on the comparison's own responses."""
    lines = []
    for name, fn in monitors.items():
        before = score_responses(fn, comparison.prompts, comparison.before).tolist()
        after = score_responses(fn, comparison.prompts, comparison.after).tolist()
        change = [a - b for a, b in zip(after, before)]
        mean = lambda values: sum(values) / max(1, len(values))  # noqa: E731
        lines.append(
            f"monitor {name} (not optimised): held-out mean {mean(before):+.4f} ± {standard_error(before):.4f} before → "
            f"{mean(after):+.4f} ± {standard_error(after):.4f} after (change {mean(change):+.4f} ± {standard_error(change):.4f})"
        )
    return lines
