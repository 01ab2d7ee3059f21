"""The training loop behind ``rlhf train``: prompts → generation → reward → PPO step → logging.

Stage numbers in comments follow docs/architecture.md ("One run, stage by stage"). :class:`TrainingRun`
is built in named parts, in the order that writes nothing until the run has started. Each step's
scores are gathered once, by ``PPOEngine.step`` (``trainer.gathered_scores``); the held-out
comparison and report.md at the end are :mod:`rlhf_cli.engine.heldout`'s, shared with ``rlhf eval``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import transformers
from omegaconf import DictConfig

from rlhf_cli.data.prompts import build_prompt_data
from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.engine import sharded_state
from rlhf_cli.engine.batches import PromptStream
from rlhf_cli.engine.components import check_launch, launch_state, prompts_per_step, settings_and_launch, total_steps
from rlhf_cli.engine.heldout import compare_on_heldout, generation_settings, write_report
from rlhf_cli.engine.monitor import build_monitors, heldout_monitor_lines, monitor_scores, monitor_stats
from rlhf_cli.engine.report import Comparison, plot_curves, summary_lines
from rlhf_cli.engine.run_dir import shared_resolved_config
from rlhf_cli.engine.run_lock import RunLock, job_lock
from rlhf_cli.engine.run_loop import LoopControl, drive
from rlhf_cli.engine.saving import append_metrics, restore_checkpoint, save_checkpoint, save_final_model, write_outputs
from rlhf_cli.engine.start_checks import check_run_start
from rlhf_cli.engine.step_metrics import log_to_trackers, show_step, throughput
from rlhf_cli.engine.together import agreed, quiet_when_peer_died
from rlhf_cli.reporting import Reporter
from rlhf_cli.models import load_policy_and_tokenizer
from rlhf_cli.ppo.stats import reward_stats
from rlhf_cli.ppo.timing import PhaseTimer
from rlhf_cli.ppo.engine import PPOEngine
from rlhf_cli.rewards import build_reward, score_responses
from rlhf_cli.rollout.generation import generate_responses
from rlhf_cli.rollout.unwrap import generation_model, synced_generation_kwargs
from rlhf_cli.seeding import set_seed


@dataclass
class Rollout:
    """Stages 1-3 of one step (this process's share), with their wall-clock seconds."""

    batch: Any  # the PromptStream batch, each prompt repeated samples_per_prompt times (prompt-major)
    responses: list[torch.Tensor]
    texts: list[str]
    scores: torch.Tensor
    generation_seconds: float
    reward_seconds: float


@dataclass
class RunSummary:
    """What a finished run hands back to its caller (the CLI prints, tests assert)."""

    output_dir: Path
    steps: int
    reward_means: list[float] = field(default_factory=list)
    comparison: Comparison | None = None


class _EngineTrainer(PPOEngine):
    """The engine's trainer: trackers are started by :meth:`TrainingRun._start`, once the run has started."""

    start_trackers_on_init = False


class TrainingRun(LoopControl):
    """One run: its parts are built once, then :meth:`train_step` is called ``steps`` times."""

    def __init__(self, cfg: DictConfig, on_start: Optional[Callable[[Path], None]] = None) -> None:
        """Build every part, in an order that writes nothing into the run directory until the run has
        really started: config and launch checks, the run directory's and checkpoint's checks, then the
        parts, then the first step's rollout (which checks the reward on real samples). Only then are
        config.yaml and metrics.jsonl written (an earlier run replaced, with overwrite=true) and
        ``on_start(run_dir)`` called (the CLI writes Hydra's .hydra/ and train.log there)."""
        self.state = launch_state()
        # Our own console shows progress; transformers' per-save tqdm bars would interleave with it.
        transformers.utils.logging.disable_progress_bar()
        self.cfg = shared_resolved_config(cfg, self.state)
        self.lock = RunLock(Path(self.cfg.output_dir))
        try:
            resumed_metrics = self._check_start()
            self._build_parts()
            self._seed_rollouts()
            # The first step's rollout, done now: a reward that raises or returns unusable scores fails
            # before anything is written. It is the very rollout step 1 uses (same RNG draws, no extra cost).
            self.pending: Optional[Rollout] = self.agreed_rollout() if self.loop.step < self.steps else None
            self._start(resumed_metrics, on_start)
        except BaseException:
            self.lock.release()  # a failed start leaves no lock file (nor a directory it created)
            raise

    # Construction, in order ----------------------------------------------------------------------
    def _check_start(self) -> list[str]:
        """Launch, run-directory and checkpoint checks (engine/start_checks.py), before any model loads;
        returns the metrics lines a continued run keeps."""
        cfg = self.cfg
        agreed(self.state, lambda: check_launch(cfg, self.state))  # sizes, precision, LoRA, sharding: before any model loads
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        # One writer per run directory, from before the checkpoint to resume from is even read.
        self.lock = job_lock(Path(cfg.output_dir), is_main=self.state.is_main_process, num_processes=self.state.num_processes)
        start = agreed(self.state, lambda: check_run_start(cfg, self.state))
        self.cfg, self.run_dir, self.watch, self.reporter, self.resume = start.cfg, start.run_dir, start.watch, start.reporter, start.resume
        self.log_error: Optional[BaseException] = None  # the main process's failed metrics write, until agreed on
        return start.resumed_metrics

    def _build_parts(self) -> None:
        """Policy and tokenizer, prompts, reward, trainer, prompt stream and step count."""
        cfg = self.cfg
        set_seed(int(cfg.seed))  # the value head's initialisation

        def load() -> Any:  # agreed: a model, data set or reward that fails on one process stops them all
            loaded = load_policy_and_tokenizer(cfg.model, disable_dropout=bool(cfg.ppo.disable_dropout))
            self.data = build_prompt_data(cfg.dataset, loaded[1], seed=int(cfg.seed))
            self.reward_fn = build_reward(cfg.reward)
            self.monitors = build_monitors(cfg.reward.monitor)  # logged only: never handed to the trainer
            return loaded

        policy, self.tokenizer = agreed(self.state, load)
        settings, launch = settings_and_launch(cfg, num_processes=self.state.num_processes, tracker_dir=str(self.run_dir.trackers_dir))
        self.trainer = _EngineTrainer(settings, policy, tokenizer=self.tokenizer, launch=launch)
        if self.trainer.sharded:
            self.reporter.print(
                f"FSDP2: policy, value head and reference sharded over {self.state.num_processes} process(es) "
                f"on {self.trainer.accelerator.device.type} (precision {cfg.ppo.precision})."
            )
        self.stream = PromptStream(
            self.data.train,
            prompts_per_step=prompts_per_step(cfg),
            process_index=self.state.process_index,
            num_processes=self.state.num_processes,
            seed=int(cfg.seed),
        )
        self.steps = total_steps(cfg, self.stream.batches_per_epoch)

    def _seed_rollouts(self) -> None:
        """Sampling and length generators, the loop state, and (when resuming) the checkpoint's state."""
        seed = int(self.cfg.seed)
        # Sampling differs per rank (different prompts deserve independent samples), and response
        # lengths come from their own generator so they do not shift the sampling stream.
        set_seed(seed + self.state.process_index)
        self.length_rng = np.random.default_rng([seed, self.state.process_index, 1])
        self.loop = ckpt.LoopState()
        if self.resume is not None:
            restore_checkpoint(self, self.resume)
        self.generation = generation_settings(
            self.cfg,
            pad_token_id=self.trainer.pad_token_id,
            eos_token_id=self.trainer.eos_token_id,
            is_encoder_decoder=self.trainer.is_encoder_decoder,
        )
        # generation.batch_size counts prompts; a rollout answers each G times, so its generate()
        # chunks hold G times as many rows and never split a group over two calls.
        chunk, group = self.generation["batch_size"], int(self.cfg.generation.samples_per_prompt)
        self.rollout_generation = dict(self.generation, batch_size=chunk * group if chunk else None)

    def _start(self, resumed_metrics: list[str], on_start: Optional[Callable[[Path], None]]) -> None:
        """Only now, with the checkpoint loaded, every part built and the reward checked, is the run
        directory written."""
        cfg = self.cfg
        self.run_dir.create(cfg, resumed_metrics=resumed_metrics, replace=bool(cfg.overwrite))
        if on_start is not None and self.state.is_main_process:
            on_start(self.run_dir.root)
        self.trainer.start_trackers()  # only now: a failed start leaves nothing under trackers/
        self.metrics = self.run_dir.metrics()
        self.reporter = Reporter(
            total_steps=self.steps, enabled=self.state.is_main_process, progress=bool(cfg.logging.progress)
        )

    # Checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (see :func:`rlhf_cli.engine.saving.save_checkpoint`)."""
        return save_checkpoint(self)

    def _budgets(self, n: int) -> list[int]:
        """``n`` response-length budgets, uniform in [response_min_tokens, response_max_tokens]."""
        gen = self.cfg.generation
        return self.length_rng.integers(int(gen.response_min_tokens), int(gen.response_max_tokens) + 1, size=n).tolist()

    def rollout(self) -> Rollout:
        """Stages 1-3 of a step: a batch of prompts, its responses (G = generation.samples_per_prompt
        per prompt), their rewards."""
        accelerator = self.trainer.accelerator
        group = int(self.cfg.generation.samples_per_prompt)
        timer = PhaseTimer()
        # 1. A batch of prompts (this process's share), each repeated G times in a row: the layout
        # PPOEngine.step expects, and the prompt texts the reward and the logs see.
        with timer("generation"):
            prompts = self.stream.next_batch()
            batch = prompts.repeated(group)
            # One length budget per prompt, shared by its G responses, so a group's rewards are
            # compared at equal budgets. With G=1 these are the very draws (one per prompt, same
            # generator, same order) and the same generate() batches as before groups existed, so
            # such a run is bit for bit unchanged.
            budgets = [budget for budget in self._budgets(len(prompts.input_ids)) for _ in range(group)]
            # 2. Rollout: batched generation with the KV cache, cut at EOS; whole groups per call.
            with generation_model(accelerator, self.trainer.model) as model, self.watch.logits_guard(self.loop.step + 1):
                responses = generate_responses(
                    model,
                    batch.input_ids,
                    max_new_tokens=budgets,
                    device=accelerator.device,
                    **self.rollout_generation,
                    **synced_generation_kwargs(accelerator, self.trainer.model),
                )
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        # 3. Reward: one float per (prompt, response).
        with timer("reward"):
            scores = score_responses(self.reward_fn, batch.queries, texts)
        return Rollout(batch, responses, texts, scores, timer.seconds["generation"], timer.seconds["reward"])

    def agreed_rollout(self) -> Rollout:
        """:meth:`rollout` on every process, or an exception on all of them (one small all-reduce)."""
        return agreed(self.state, self.rollout)

    def train_step(self) -> dict[str, Any]:
        """One PPO step; returns the metrics written for it."""
        step = self.loop.step + 1
        rollout, self.pending = self.pending or self.agreed_rollout(), None
        # 4. PPO step.
        timer = PhaseTimer()
        with timer("ppo_step"):
            stats = quiet_when_peer_died(
                self.state, lambda: self.trainer.step(rollout.batch.input_ids, rollout.responses, rollout.scores)
            )
        # 5. Logging. The step gathered every process's scores once; env/reward_* come from them.
        all_scores = self.trainer.gathered_scores
        stats.update(reward_stats(all_scores))
        stats.update(throughput(self.trainer.accelerator, rollout, timer.seconds["ppo_step"], all_scores.numel()))
        # Monitors score this process's responses (agreed: one failing stops all), then gather them.
        scores = agreed(self.state, lambda: monitor_scores(self.monitors, rollout.batch.queries, rollout.texts))
        stats.update(monitor_stats(scores, self.trainer.accelerator))
        try:
            self._log(step, stats, rollout.batch.queries, rollout.texts, all_scores)
        except Exception as err:  # main process only: raised on every process by stop_requested
            self.log_error = err
        self.loop.step = step
        self.loop.epoch, self.loop.batch_in_epoch = self.stream.position.epoch, self.stream.position.batch_in_epoch
        self.loop.reward_means.append(stats["env/reward_mean"])
        self.watch.after_step(step, stats)  # the line is written first: it says what went wrong
        return stats

    def _log(self, step: int, stats: dict[str, Any], queries: list[str], texts: list[str], all_scores: torch.Tensor) -> None:
        """The trackers, metrics.jsonl and the console (engine/step_metrics.py); main process only."""
        if not self.state.is_main_process:
            return
        # This process's own responses come first in rank order (queries repeat each prompt per response).
        rewards = all_scores[: len(texts)].tolist()
        log_to_trackers(self.trainer, stats, queries, texts, rewards)
        append_metrics(self, step, stats)
        show_step(self.reporter, self.cfg.logging, step, stats, queries, texts, rewards)

    def finish(self) -> RunSummary:
        """Save ``final/``, print the before/after table, write report.md and curves.png (main process)."""
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()
        policy, reference = accelerator.unwrap_model(self.trainer.model), None
        if self.trainer.sharded:  # plain models on rank 0, from the gathered weights (a collective)
            policy, reference = sharded_state.models_for_finish(self.cfg, policy, self.state.is_main_process)
        main = self.state.is_main_process
        comparison = agreed(self.state, lambda: self._write_final(policy, reference) if main else None)
        if self.trainer.launch.log_with:
            accelerator.end_training()
        return RunSummary(self.run_dir.root, self.steps, list(self.loop.reward_means), comparison)

    def _write_final(self, policy, reference) -> Comparison | None:
        """The before/after comparison, final/, report.md and curves.png (main process). The comparison
        comes first: its generation is the last check that the weights still give finite logits."""
        with self.watch.logits_guard(self.loop.step):
            comparison = self._compare(policy, reference)
        save_final_model(self, policy)
        root, advice = self.run_dir.root, "final/ is complete; free some space, then write them with `rlhf eval`."
        monitor_lines = heldout_monitor_lines(self.monitors, comparison) if comparison is not None else []
        if comparison is not None:
            write_outputs(self.run_dir.report_path, "report.md",
                          lambda: write_report(root, comparison, self.loop.reward_means, monitor_lines), advice=advice)
        write_outputs(self.run_dir.curves_path, "curves.png",
                      lambda: plot_curves(self.run_dir.metrics_path, self.run_dir.curves_path), advice=advice)
        for line in [*monitor_lines, *summary_lines(comparison, self.loop.reward_means, self.run_dir.root)]:
            self.reporter.print(line)
        return comparison

    def _compare(self, policy, plain_reference=None) -> Comparison | None:
        rows = min(int(self.cfg.eval_prompts), len(self.data.heldout))
        if rows == 0:
            return None
        reference_context = contextlib.nullcontext(plain_reference) if plain_reference is not None else self.trainer.reference_context()
        with reference_context as reference:
            return compare_on_heldout(
                self.cfg,
                self.data.heldout,
                rows,
                before_model=self.trainer.accelerator.unwrap_model(reference),
                after_model=policy,
                tokenizer=self.tokenizer,
                reward_fn=self.reward_fn,
                generation=self.generation,
                device=self.trainer.accelerator.device,
            )


def run_training(cfg: DictConfig, on_start: Optional[Callable[[Path], None]] = None) -> RunSummary:
    """Run (or continue) a whole training job described by a composed ``rlhf train`` config.

    ``on_start(run_dir)`` is called once the run has really started (see :class:`TrainingRun`).
    SIGTERM/SIGINT finish the current step, write a checkpoint and raise :class:`Preempted`.
    """
    return drive(TrainingRun(cfg, on_start))
