"""The run behind ``rlhf reward``: the engine's conventions around :class:`RewardModelTrainer`.

Same rules as ``rlhf train`` (and the same pieces): nothing is written into the run directory before
the run has started (``RunDirectory.check_start``, then the model, data and optimiser, then
``RunDirectory.create``); checkpoints ``checkpoints/step-N`` for exact resume (``engine.checkpoint``);
SIGTERM/SIGINT finish the step, checkpoint and exit 75 (``engine.signals``); metrics.jsonl, the rich
progress bar, ``final/`` (the reward model, loadable by ``reward=learned``), report.md and curves.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from omegaconf import DictConfig

from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.engine.components import launch_state
from rlhf_cli.engine.divergence import STEPS_IN_A_ROW, DivergenceWatch
from rlhf_cli.engine.export import save_final
from rlhf_cli.engine.report import plot_curves
from rlhf_cli.engine.run_dir import RunDirectory, shared_resolved_config
from rlhf_cli.engine.run_lock import RunLock, job_lock
from rlhf_cli.engine.run_loop import LoopControl, drive
from rlhf_cli.engine.saving import append_metrics, checkpoint_bytes, parameter_bytes, resume_advice, write_checkpoint, write_outputs
from rlhf_cli.engine.together import agreed, quiet_when_peer_died
from rlhf_cli.errors import ConfigError, DataError
from rlhf_cli.reporting import Reporter
from rlhf_cli.reward_model.backbone import load_reward_backbone, save_sequence_classifier
from rlhf_cli.reward_model.data import build_preference_data
from rlhf_cli.reward_model.evaluate import PairScore, report_markdown, score_model_on_pairs, score_reward_on_pairs
from rlhf_cli.models.reward_scoring import VALUE_HEAD, ScoringRule
from rlhf_cli.reward_model.trainer import RewardModelTrainer
from rlhf_cli.seeding import set_seed

# Changing these makes a checkpoint meaningless for this run (other weights, pairs, order or batch shape).
BREAKING = ("model.", "data.", "seed", "optim.batch_size")
HARMLESS = ("optim.steps", "optim.epochs", "logging.", "checkpoint.", "output_dir", "threads", "overwrite", "eval.")
HEADLINE = (("train/loss", "loss", "{:.3f}"), ("train/accuracy", "acc", "{:.2f}"), ("train/margin", "margin", "{:+.3f}"))
CURVES = [("train/loss", "Bradley–Terry loss"), ("train/accuracy", "pair accuracy (training batch)"),
          ("train/margin", "mean margin r(chosen) − r(rejected)")]


@dataclass
class RewardRunSummary:
    output_dir: Path
    steps: int
    results: list[PairScore] = field(default_factory=list)


class RewardTrainingRun(LoopControl):
    """One ``rlhf reward`` run, built in an order that writes nothing until it has started."""

    def __init__(self, cfg: DictConfig, on_start: Optional[Callable[[Path], None]] = None) -> None:
        self.state = launch_state()
        transformers.utils.logging.disable_progress_bar()
        self.cfg = shared_resolved_config(cfg, self.state)
        self.lock = RunLock(Path(self.cfg.output_dir))
        self.log_error: Optional[BaseException] = None  # the main process's failed metrics write, until agreed on
        try:
            resumed_metrics = self._check_start()
            self._build()
            self.loop = ckpt.LoopState()
            if self.resume is not None:
                self._restore(self.resume)
            self._start(resumed_metrics, on_start)
        except BaseException:
            self.lock.release()  # a failed start leaves no lock file (nor a directory it created)
            raise

    def _check_start(self) -> list[str]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if int(cfg.optim.batch_size) % self.state.num_processes:
            raise ConfigError(
                f"optim.batch_size={cfg.optim.batch_size} pairs must divide by the {self.state.num_processes} processes "
                f"of this launch (each scores an equal share). Use a multiple of {self.state.num_processes}."
            )
        # One writer per run directory, from before the checkpoint to resume from is even read.
        self.lock = job_lock(Path(cfg.output_dir), is_main=self.state.is_main_process,
                             num_processes=self.state.num_processes, command="rlhf reward")
        self.run_dir = RunDirectory(Path(cfg.output_dir), is_main=self.state.is_main_process)
        self.watch = DivergenceWatch(cfg, self.run_dir.root, is_main=self.state.is_main_process, reward_model=True)
        self.reporter = Reporter(total_steps=0, enabled=self.state.is_main_process, progress=False)
        self.resume, notices = ckpt.find_resume_point(cfg.checkpoint.resume, self.run_dir.root, self.state.process_index)
        continuing = self.run_dir.check_start(resume_from=self.resume.path if self.resume else None,
                                              resume=cfg.checkpoint.resume, overwrite=bool(cfg.overwrite))
        for notice in notices:
            self.reporter.print(notice)
        if self.resume is not None:
            ckpt.check_resumable(self.resume, self.cfg, self.state.num_processes, self.reporter.print,
                                 breaking=BREAKING, harmless=HARMLESS)
        if continuing and self.state.is_main_process:
            kept, notice = self.run_dir.resumed_metrics(self.resume.step)
            if notice:
                self.reporter.print(notice)
            return kept
        return []

    def _build(self) -> None:
        cfg = self.cfg
        set_seed(int(cfg.seed))  # the scalar head's initialisation
        backbone = load_reward_backbone(cfg.model, disable_dropout=True)
        model, self.tokenizer, self.head = backbone.model, backbone.tokenizer, backbone.head
        self.data = build_preference_data(cfg.data, self.tokenizer, int(cfg.seed), self.head)
        for notice in backbone.notices + self.data.notices:
            self.reporter.print(notice)
        optim = cfg.optim
        self.trainer = RewardModelTrainer(
            model, self.tokenizer, self.data.train, learning_rate=float(optim.learning_rate),
            batch_size=int(optim.batch_size), seed=int(cfg.seed), ties=str(cfg.data.ties),
            center_rewards_coefficient=float(optim.center_rewards_coefficient), weight_decay=float(optim.weight_decay),
            adam_eps=float(optim.adam_eps), max_grad_norm=optim.max_grad_norm, accelerator=Accelerator(), head=self.head,
        )
        per_epoch = self.trainer.batches_per_epoch
        if per_epoch == 0:
            raise DataError(
                f"{len(self.data.train)} training pairs make no full batch of optim.batch_size={optim.batch_size}. "
                f"Lower optim.batch_size or give more pairs."
            )
        self.steps = int(optim.steps) if optim.steps else int(optim.epochs) * per_epoch
        # The untrained model's held-out result, measured now (before any checkpoint weights load).
        self.untrained = self._evaluate_model("untrained (same backbone, fresh head)") if self.state.is_main_process else None

    def _restore(self, point: ckpt.ResumePoint) -> None:
        ckpt.load_weights(point.path, self.trainer.unwrapped_model)
        self.trainer.load_state_dict(point.trainer_state)
        point.trainer_state = {}
        ckpt.restore_rng(point.rng, np.random.default_rng(0))
        saved = point.state
        self.loop = ckpt.LoopState(step=int(saved["step"]), epoch=int(saved["epoch"]), batch_in_epoch=int(saved["batch_in_epoch"]))

    def _start(self, resumed_metrics: list[str], on_start: Optional[Callable[[Path], None]]) -> None:
        self.run_dir.create(self.cfg, resumed_metrics=resumed_metrics, replace=bool(self.cfg.overwrite))
        if on_start is not None and self.state.is_main_process:
            on_start(self.run_dir.root)
        self.metrics = self.run_dir.metrics()
        self.reporter = Reporter(total_steps=self.steps, enabled=self.state.is_main_process,
                                 progress=bool(self.cfg.logging.progress), label="RM", headline=HEADLINE)

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        # A peer that died inside the step's collectives: this process stops quietly (the peer says why).
        stats = quiet_when_peer_died(self.state, lambda: self.trainer.step(self.loop.epoch, self.loop.batch_in_epoch))
        seconds = time.perf_counter() - started
        stats.update({"time/step": seconds, "perf/pairs_per_s": int(self.cfg.optim.batch_size) / seconds})
        self.loop.step += 1
        self.loop.batch_in_epoch += 1
        if self.loop.batch_in_epoch == self.trainer.batches_per_epoch:
            self.loop.epoch, self.loop.batch_in_epoch = self.loop.epoch + 1, 0
        if self.state.is_main_process:
            try:
                append_metrics(self, self.loop.step, stats)
            except Exception as err:  # main process only: raised on every process by stop_requested
                self.log_error = err
            self.reporter.advance(self.loop.step, stats)
            if self.loop.step % int(self.cfg.logging.log_every) == 0:
                self.reporter.stats_line(self.loop.step, stats)
        what = f"the loss or gradient norm was not finite in {STEPS_IN_A_ROW} steps in a row (their updates were skipped)"
        self.watch.count(self.loop.step, bool(stats["train/skipped_update"]), what)  # after the line that says so
        return stats

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N`` (every rank writes its RNG state; rank 0 the rest), written as
        :func:`rlhf_cli.engine.saving.write_checkpoint` writes ``rlhf train``'s."""
        model, state, step = self.trainer.unwrapped_model, self.state, self.loop.step
        self.watch.check_weights(model, step, f"checkpoints/step-{step}")
        return write_checkpoint(
            state, self.run_dir.root, step, keep=int(self.cfg.checkpoint.keep), needed=checkpoint_bytes(self, model),
            advice=resume_advice(self),
            # The pair order is a function of (seed, epoch): no data generator to save; the slot holds a placeholder.
            rank_files=lambda tmp: ckpt.write_rng_file(tmp, state.process_index, np.random.default_rng(0)),
            main_files=lambda tmp: ckpt.write_main_files(
                tmp, model=model, trainer_state=self.trainer.state_dict(), tokenizer=self.tokenizer, cfg=self.cfg,
                loop=self.loop, num_processes=state.num_processes),
        )

    def _evaluate_model(self, name: str) -> PairScore:
        return score_model_on_pairs(name, self.trainer.unwrapped_model, self.tokenizer, self.data.heldout,
                                    batch_size=int(self.cfg.eval.batch_size), device=self.trainer.accelerator.device,
                                    head=self.head)

    def _baselines(self) -> list[PairScore]:
        from rlhf_cli.rewards import build_reward

        results = []
        for index, source in enumerate(self.cfg.eval.baselines):
            name = f"{source.type}" + (f" ({source.text})" if source.type in ("vader", "classifier") else "")
            results.append(score_reward_on_pairs(name, build_reward(source), self.data.heldout_rows, self.data.heldout.ties))
        return results

    def finish(self) -> RewardRunSummary:
        """Save ``final/`` (model, tokenizer, scoring rule), evaluate on the held-out pairs, write the
        report (main process; agreed, so a failed write there stops every process)."""
        results = agreed(self.state, lambda: self._write_final() if self.state.is_main_process else [])
        return RewardRunSummary(self.run_dir.root, self.steps, results or [])

    def _write_final(self) -> list[PairScore]:
        model, final_dir = self.trainer.unwrapped_model, self.run_dir.final_dir
        self.watch.check_weights(model, self.loop.step, "final/")
        save = save_final if self.head == VALUE_HEAD else save_sequence_classifier

        def write_final() -> None:
            save(model, self.tokenizer, final_dir)
            ScoringRule(max_length=int(self.cfg.data.max_length), head=self.head).save(final_dir)

        write_outputs(final_dir, "final/", write_final, needed=parameter_bytes(model), advice=resume_advice(self))
        results = [self._evaluate_model("learned (this run)"), self.untrained, *self._baselines()]
        advice = "final/ is complete; free some space, then run the same command again to write them."
        report = report_markdown(results, steps=self.loop.step, pairs=len(self.data.train))
        write_outputs(self.run_dir.report_path, "report.md",
                      lambda: self.run_dir.report_path.write_text(report, encoding="utf-8"), advice=advice)
        write_outputs(self.run_dir.curves_path, "curves.png",
                      lambda: plot_curves(self.run_dir.metrics_path, self.run_dir.curves_path, CURVES), advice=advice)
        for result in results:
            self.reporter.print(result.line())
        self.reporter.print(f"run directory: [bold]{self.run_dir.root}[/]  (final/ is the reward model: "
                            f"rlhf train reward=learned reward.model={self.run_dir.root})")
        return results


def run_reward_training(cfg: DictConfig, on_start: Optional[Callable[[Path], None]] = None) -> RewardRunSummary:
    """Run (or continue) a ``rlhf reward`` job; SIGTERM/SIGINT checkpoint and raise :class:`Preempted`."""
    return drive(RewardTrainingRun(cfg, on_start))
