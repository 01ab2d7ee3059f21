"""What ``rlhf train`` records of a step beside the engine's stats, and where it shows them.

One dict per step holds the engine's stats (``ppo/stats.py``: TRL's names, and ``env/reward_*``), the
monitors' (``engine/monitor.py``) and the run's own, computed here: ``time/*`` (seconds of generation,
reward and PPO step) and ``perf/*`` (new tokens and samples per second, over all processes).
``engine/train.py`` appends it to metrics.jsonl; the trackers and the console get it from here, on
the main process only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlhf_cli.ppo.stats import scalar_stats
from rlhf_cli.reporting import Reporter, tracker_logs

if TYPE_CHECKING:
    from rlhf_cli.engine.train import Rollout
    from rlhf_cli.ppo.engine import PPOEngine


def throughput(accelerator: Any, rollout: Rollout, ppo_seconds: float, samples: int) -> dict[str, float]:
    """time/* and perf/* of a step (new tokens summed over the processes: a collective)."""
    new_tokens = accelerator.gather(torch.tensor([sum(len(r) for r in rollout.responses)], device=accelerator.device)).sum()
    elapsed = rollout.generation_seconds + rollout.reward_seconds + ppo_seconds
    return {
        "time/generation": rollout.generation_seconds,
        "time/reward": rollout.reward_seconds,
        "time/ppo_step": ppo_seconds,
        "time/step": elapsed,
        "perf/tokens_per_s": float(new_tokens) / elapsed,
        "perf/samples_per_s": samples / elapsed,
    }


def log_to_trackers(trainer: PPOEngine, stats: dict[str, Any], queries: Sequence[str], texts: Sequence[str],
                    rewards: Sequence[float]) -> None:
    """The step's scalars and a table of its samples, to the Accelerate trackers the run logs with (if any)."""
    if trainer.launch.log_with:
        logs = tracker_logs(scalar_stats(stats), {"query": queries, "response": texts}, rewards)
        trainer.accelerator.log(logs, step=trainer.current_step)


def show_step(reporter: Reporter, log: Any, step: int, stats: dict[str, Any], queries: Sequence[str],
              texts: Sequence[str], rewards: Sequence[float]) -> None:
    """The console: the progress bar, and as ``log`` (the ``logging`` group) asks, the headline numbers
    every ``log_every`` steps and the first ``sample_rows`` samples every ``sample_every`` steps."""
    reporter.advance(step, stats)
    if log.log_every and step % int(log.log_every) == 0:
        reporter.stats_line(step, stats)
    if log.sample_every and step % int(log.sample_every) == 0:
        rows = int(log.sample_rows)
        reporter.sample_table(f"samples at step {step}", queries[:rows], texts[:rows], rewards[:rows])
