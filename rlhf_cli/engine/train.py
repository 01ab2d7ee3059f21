"""The training loop behind ``rlhf train``: prompts → generation → reward → PPO step → logging.

Stage numbers in comments follow DESIGN §4.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from accelerate import PartialState
from omegaconf import DictConfig
from rich.table import Table

from rlhf_cli.data.prompts import build_prompt_data
from rlhf_cli.engine.batches import PromptStream
from rlhf_cli.engine.components import ppo_config_from, total_steps
from rlhf_cli.engine.report import Comparison, compare_before_after
from rlhf_cli.engine.run_dir import RunDirectory, shared_resolved_config
from rlhf_cli.logging import Reporter
from rlhf_cli.models import load_policy_and_tokenizer
from rlhf_cli.ppo.stats import reward_stats
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.rewards import build_reward, score_responses
from rlhf_cli.rollout.generation import generate_responses
from rlhf_cli.seeding import set_seed


@dataclass
class RunSummary:
    """What a finished run hands back to its caller (the CLI prints, tests assert)."""

    output_dir: Path
    steps: int
    reward_means: list[float] = field(default_factory=list)
    comparison: Comparison | None = None


def generation_settings(cfg: DictConfig, trainer: PPOTrainer) -> dict[str, Any]:
    """Keyword arguments for :func:`generate_responses` (budgets excluded)."""
    gen = cfg.generation
    return dict(
        pad_token_id=trainer.pad_token_id,
        eos_token_id=trainer.eos_token_id,
        is_encoder_decoder=trainer.is_encoder_decoder,
        batch_size=gen.batch_size,
        do_sample=bool(gen.do_sample),
        top_k=int(gen.top_k),
        top_p=float(gen.top_p),
        temperature=float(gen.temperature),
    )


class TrainingRun:
    """One run: its parts are built once, then :meth:`train_step` is called ``steps`` times."""

    def __init__(self, cfg: DictConfig) -> None:
        self.state = PartialState()
        # Our own console shows progress; transformers' per-save tqdm bars would interleave with it.
        transformers.utils.logging.disable_progress_bar()
        self.cfg = shared_resolved_config(cfg, self.state)
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.run_dir = RunDirectory(Path(cfg.output_dir), is_main=self.state.is_main_process)
        self.run_dir.create(cfg)

        policy, self.tokenizer = load_policy_and_tokenizer(cfg.model, disable_dropout=bool(cfg.ppo.disable_dropout))
        self.data = build_prompt_data(cfg.dataset, self.tokenizer, seed=int(cfg.seed))
        self.reward_fn = build_reward(cfg.reward)
        ppo_config = ppo_config_from(cfg, num_processes=self.state.num_processes, tracker_dir=str(self.run_dir.trackers_dir))
        self.trainer = PPOTrainer(ppo_config, policy, tokenizer=self.tokenizer)
        self.stream = PromptStream(
            self.data.train,
            global_batch_size=int(cfg.ppo.batch_size),
            process_index=self.state.process_index,
            num_processes=self.state.num_processes,
            seed=int(cfg.seed),
        )
        self.steps = total_steps(cfg, self.stream.batches_per_epoch)
        # Sampling differs per rank (different prompts deserve independent samples), and response
        # lengths come from their own generator so they do not shift the sampling stream.
        set_seed(int(cfg.seed) + self.state.process_index)
        self.length_rng = np.random.default_rng([int(cfg.seed), self.state.process_index, 1])
        self.generation = generation_settings(cfg, self.trainer)
        self.metrics = self.run_dir.metrics()
        self.reporter = Reporter(
            total_steps=self.steps, enabled=self.state.is_main_process, progress=bool(cfg.logging.progress)
        )

    def _budgets(self, n: int) -> list[int]:
        gen = self.cfg.generation
        return self.length_rng.integers(int(gen.response_min_tokens), int(gen.response_max_tokens) + 1, size=n).tolist()

    def train_step(self, step: int) -> dict[str, Any]:
        """One PPO step; returns the scalar metrics written for it."""
        accelerator = self.trainer.accelerator
        start = time.perf_counter()
        # 1. A batch of prompts (this process's share).
        batch = self.stream.next_batch()
        # 2. Rollout: batched generation with the KV cache, cut at EOS.
        responses = generate_responses(
            accelerator.unwrap_model(self.trainer.model),
            batch.input_ids,
            max_new_tokens=self._budgets(len(batch.input_ids)),
            device=accelerator.device,
            **self.generation,
        )
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        generated = time.perf_counter()
        # 3. Reward: one float per (prompt, response).
        scores = score_responses(self.reward_fn, batch.queries, texts)
        scored = time.perf_counter()
        # 4. PPO step.
        stats = self.trainer.step(batch.input_ids, responses, scores)
        stepped = time.perf_counter()
        # 5. Logging.
        all_scores = accelerator.gather(scores.to(accelerator.device))
        new_tokens = accelerator.gather(torch.tensor([sum(len(r) for r in responses)], device=accelerator.device)).sum()
        elapsed = stepped - start
        stats.update(reward_stats(all_scores))
        stats.update(
            {
                "time/generation": generated - start,
                "time/reward": scored - generated,
                "time/ppo_step": stepped - scored,
                "time/step": elapsed,
                "perf/tokens_per_s": float(new_tokens) / elapsed,
                "perf/samples_per_s": all_scores.numel() / elapsed,
            }
        )
        self._log(step, stats, batch.queries, texts, scores.tolist())
        return stats

    def _log(self, step: int, stats: dict[str, Any], queries: list[str], texts: list[str], rewards: list[float]) -> None:
        log = self.cfg.logging
        if self.trainer.config.log_with:
            self.trainer.log_stats(stats, {"query": queries, "response": texts}, rewards)
        if not self.state.is_main_process:
            return
        self.metrics.write(step, stats)
        self.reporter.advance(step, stats)
        if log.log_every and step % int(log.log_every) == 0:
            self.reporter.stats_line(step, stats)
        if log.sample_every and step % int(log.sample_every) == 0:
            rows = int(log.sample_rows)
            self.reporter.sample_table(f"samples at step {step}", queries[:rows], texts[:rows], rewards[:rows])

    def finish(self, reward_means: list[float]) -> RunSummary:
        """Save ``final/`` and print the before/after table (main process)."""
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()
        policy = accelerator.unwrap_model(self.trainer.model)
        comparison = None
        if self.state.is_main_process:
            policy.save_pretrained(self.run_dir.final_dir)
            self.tokenizer.save_pretrained(self.run_dir.final_dir)
            comparison = self._compare(policy)
            self._print_summary(reward_means, comparison)
        accelerator.wait_for_everyone()
        if self.trainer.config.log_with:
            accelerator.end_training()
        return RunSummary(self.run_dir.root, self.steps, reward_means, comparison)

    def _compare(self, policy) -> Comparison | None:
        rows = min(int(self.cfg.eval_prompts), len(self.data.heldout))
        if rows == 0:
            return None
        heldout = self.data.heldout.select(range(rows))
        prompt_ids = [torch.tensor(ids, dtype=torch.long) for ids in heldout["input_ids"]]
        generation = dict(self.generation, max_new_tokens=int(self.cfg.generation.response_max_tokens))
        with self.trainer.reference_context() as reference:
            before_model = self.trainer.accelerator.unwrap_model(reference)
            return compare_before_after(
                before_model=before_model,
                after_model=policy,
                prompt_ids=prompt_ids,
                prompts=list(heldout["query"]),
                tokenizer=self.tokenizer,
                reward_fn=self.reward_fn,
                generation=generation,
                seed=int(self.cfg.seed),
                device=self.trainer.accelerator.device,
            )

    def _print_summary(self, reward_means: list[float], comparison: Comparison | None) -> None:
        reporter = self.reporter
        if comparison is not None:
            table = Table(title="before / after training (held-out prompts)", expand=True)
            table.add_column("prompt", ratio=2, overflow="fold")
            table.add_column("before", ratio=3, overflow="fold")
            table.add_column("reward", justify="right", no_wrap=True)
            table.add_column("after", ratio=3, overflow="fold")
            table.add_column("reward", justify="right", no_wrap=True)
            for row in zip(comparison.prompts, comparison.before, comparison.before_rewards, comparison.after, comparison.after_rewards):
                table.add_row(row[0], row[1], f"{row[2]:+.3f}", row[3], f"{row[4]:+.3f}")
            table.add_row("[bold]mean[/]", "", f"[bold]{comparison.mean_before:+.3f}[/]", "", f"[bold]{comparison.mean_after:+.3f}[/]")
            reporter.print(table)
        window = max(1, min(5, len(reward_means) // 4))
        if len(reward_means) >= 2 * window:
            first = sum(reward_means[:window]) / window
            last = sum(reward_means[-window:]) / window
            reporter.print(f"mean reward: first {window} steps {first:+.3f} → last {window} steps {last:+.3f}")
        reporter.print(f"run directory: [bold]{self.run_dir.root}[/]  (config.yaml, metrics.jsonl, final/)")


def run_training(cfg: DictConfig) -> RunSummary:
    """Run a whole training job described by a composed ``rlhf train`` config."""
    run = TrainingRun(cfg)
    reward_means: list[float] = []
    with run.reporter:
        for step in range(1, run.steps + 1):
            stats = run.train_step(step)
            reward_means.append(stats["env/reward_mean"])
    return run.finish(reward_means)
