"""The training loop behind ``rlhf train``: prompts → generation → reward → PPO step → logging.

Stage numbers in comments follow docs/architecture.md ("One run, stage by stage"). :class:`TrainingRun` is built in named parts, in the
order that writes nothing until the run has started (``_check_start``, ``_build_parts``,
``_seed_rollouts``, the first rollout, ``_start``). Each step's scores are gathered once, by
``PPOEngine.step`` (``trainer.gathered_scores``): ``env/reward_*``, the sample table and the
trackers (through :func:`rlhf_cli.reporting.tracker_logs`) all read them. The held-out comparison
and report.md at the end are :mod:`rlhf_cli.engine.heldout`'s, shared with ``rlhf eval``.
"""

from __future__ import annotations

import contextlib
import shutil
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
from rlhf_cli.engine.batches import PromptStream, StreamPosition
from rlhf_cli.engine.components import check_launch, launch_state, prompts_per_step, settings_and_launch, total_steps, with_resolved_precision
from rlhf_cli.engine.export import save_final
from rlhf_cli.engine.heldout import compare_on_heldout, generation_settings, write_report
from rlhf_cli.engine.monitor import build_monitors, heldout_monitor_lines, monitor_stats
from rlhf_cli.engine.report import Comparison, comparison_table, plot_curves
from rlhf_cli.engine.run_dir import RunDirectory, shared_resolved_config
from rlhf_cli.engine.signals import Preempted, StopRequest
from rlhf_cli.reporting import Reporter, tracker_logs
from rlhf_cli.models import load_policy_and_tokenizer
from rlhf_cli.ppo.sharding import full_model_state, load_full_model_state
from rlhf_cli.ppo.stats import reward_stats, scalar_stats
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


class TrainingRun:
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
        resumed_metrics = self._check_start()
        self._build_parts()
        self._seed_rollouts()
        # The first step's rollout, done now: a reward that raises or returns unusable scores fails
        # before anything is written. It is the very rollout step 1 uses (same RNG draws, no extra cost).
        self.pending: Optional[Rollout] = self.rollout() if self.loop.step < self.steps else None
        self._start(resumed_metrics, on_start)

    # Construction, in order ----------------------------------------------------------------------
    def _check_start(self) -> list[str]:
        """Launch, run-directory and checkpoint checks, before any model loads; returns the metrics
        lines a continued run keeps."""
        cfg = self.cfg
        check_launch(cfg, self.state)  # sizes, precision, LoRA, sharding: before any model loads
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.run_dir = RunDirectory(Path(cfg.output_dir), is_main=self.state.is_main_process)
        self.reporter = Reporter(total_steps=0, enabled=self.state.is_main_process, progress=False)
        # The checkpoint is read (trainer state included) and checked before any model loads.
        self.resume, notices = ckpt.find_resume_point(cfg.checkpoint.resume, self.run_dir.root, self.state.process_index)
        continuing = self.run_dir.check_start(
            resume_from=self.resume.path if self.resume else None,
            resume=cfg.checkpoint.resume,
            overwrite=bool(cfg.overwrite),
        )
        for notice in notices:  # after the refusal: "starting a fresh run" must not precede one
            self.reporter.print(notice)
        # ppo.precision=auto becomes this device's precision (a resumed run's: its checkpoint's), once.
        self.cfg = with_resolved_precision(cfg, self.state.device.type, self.resume and self.resume.config, self.reporter.print)
        if self.resume is not None:
            ckpt.check_resumable(self.resume, self.cfg, self.state.num_processes, self.reporter.print)
        resumed_metrics: list[str] = []
        if continuing and self.state.is_main_process:
            resumed_metrics, notice = self.run_dir.resumed_metrics(self.resume.step)
            if notice:
                self.reporter.print(notice)
        return resumed_metrics

    def _build_parts(self) -> None:
        """Policy and tokenizer, prompts, reward, trainer, prompt stream and step count."""
        cfg = self.cfg
        set_seed(int(cfg.seed))  # the value head's initialisation
        policy, self.tokenizer = load_policy_and_tokenizer(cfg.model, disable_dropout=bool(cfg.ppo.disable_dropout))
        self.data = build_prompt_data(cfg.dataset, self.tokenizer, seed=int(cfg.seed))
        self.reward_fn = build_reward(cfg.reward)
        self.monitors = build_monitors(cfg.reward.monitor)  # logged only: never handed to the trainer
        settings, launch = settings_and_launch(cfg, num_processes=self.state.num_processes, tracker_dir=str(self.run_dir.trackers_dir))
        self.trainer = PPOEngine(settings, policy, tokenizer=self.tokenizer, launch=launch)
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
            self._restore(self.resume)
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
        self.metrics = self.run_dir.metrics()
        self.reporter = Reporter(
            total_steps=self.steps, enabled=self.state.is_main_process, progress=bool(cfg.logging.progress)
        )

    # Checkpoints -------------------------------------------------------------------------------
    def _restore(self, point: ckpt.ResumePoint) -> None:
        accelerator = self.trainer.accelerator
        saved = point.state
        if self.trainer.sharded:  # every process reads the full weights and keeps its shard
            weights = sharded_state.read_weights(point.path)
            sharded_state.check_weights_fit(point.path, weights, self.trainer.model)
            load_full_model_state(self.trainer.model, weights)
        else:
            ckpt.load_weights(point.path, accelerator.unwrap_model(self.trainer.model))
        self.trainer.load_state_dict(point.trainer_state)
        point.trainer_state = {}  # now in the optimizer: no second copy of its state for the whole run
        ckpt.restore_rng(point.rng, self.length_rng)
        self.stream.position = StreamPosition(int(saved["epoch"]), int(saved["batch_in_epoch"]))
        self.loop = ckpt.LoopState(
            step=int(saved["step"]),
            epoch=int(saved["epoch"]),
            batch_in_epoch=int(saved["batch_in_epoch"]),
            reward_means=[float(r) for r in saved["reward_means"]],
        )

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (all ranks take part: each saves its own RNG state)."""
        accelerator = self.trainer.accelerator
        tmp = ckpt.temporary_dir(self.run_dir.root, self.loop.step)
        if self.state.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash while writing this very step
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        ckpt.write_rng_file(tmp, self.state.process_index, self.length_rng)
        # Sharded: gathering the full weights and optimiser state is a collective of every process.
        trainer_state = self.trainer.state_dict()
        weights = full_model_state(self.trainer.model) if self.trainer.sharded else None
        accelerator.wait_for_everyone()
        if self.state.is_main_process:
            ckpt.write_main_files(
                tmp,
                model=accelerator.unwrap_model(self.trainer.model),
                weights=weights,
                trainer_state=trainer_state,
                tokenizer=self.tokenizer,
                cfg=self.cfg,
                loop=self.loop,
                num_processes=self.state.num_processes,
            )
            ckpt.publish(tmp, self.loop.step, int(self.cfg.checkpoint.keep))
        accelerator.wait_for_everyone()
        return tmp.parent / f"step-{self.loop.step}"

    def checkpoint_due(self) -> bool:
        every = int(self.cfg.checkpoint.every)
        return every > 0 and self.loop.step % every == 0

    def stop_requested(self, request: StopRequest) -> bool:
        """Whether any process received a stop signal (one tiny all-reduce when distributed)."""
        flag = request.received is not None
        if self.state.num_processes == 1:
            return flag
        accelerator = self.trainer.accelerator
        return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)

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
            with generation_model(accelerator, self.trainer.model) as model:
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

    def train_step(self) -> dict[str, Any]:
        """One PPO step; returns the metrics written for it."""
        step = self.loop.step + 1
        rollout, self.pending = self.pending or self.rollout(), None
        # 4. PPO step.
        timer = PhaseTimer()
        with timer("ppo_step"):
            stats = self.trainer.step(rollout.batch.input_ids, rollout.responses, rollout.scores)
        # 5. Logging. The step gathered every process's scores once; env/reward_* come from them.
        all_scores = self.trainer.gathered_scores
        stats.update(reward_stats(all_scores))
        stats.update(self._throughput(rollout, timer.seconds["ppo_step"], all_scores.numel()))
        stats.update(monitor_stats(self.monitors, rollout.batch.queries, rollout.texts, self.trainer.accelerator))
        self._log(step, stats, rollout.batch.queries, rollout.texts, all_scores)
        self.loop.step = step
        self.loop.epoch, self.loop.batch_in_epoch = self.stream.position.epoch, self.stream.position.batch_in_epoch
        self.loop.reward_means.append(stats["env/reward_mean"])
        return stats

    def _throughput(self, rollout: Rollout, ppo_seconds: float, samples: int) -> dict[str, float]:
        """time/* and perf/* of a step (new tokens summed over the processes)."""
        accelerator = self.trainer.accelerator
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

    def _log(self, step: int, stats: dict[str, Any], queries: list[str], texts: list[str], all_scores: torch.Tensor) -> None:
        """metrics.jsonl, the console and the trackers (through rlhf_cli.reporting); main process only."""
        log = self.cfg.logging
        if not self.state.is_main_process:
            return
        # This process's own responses come first in rank order (queries repeat each prompt per response).
        rewards = all_scores[: len(texts)].tolist()
        if self.trainer.launch.log_with:
            logs = tracker_logs(scalar_stats(stats), {"query": queries, "response": texts}, rewards)
            self.trainer.accelerator.log(logs, step=self.trainer.current_step)
        self.metrics.write(step, stats)
        self.reporter.advance(step, stats)
        if log.log_every and step % int(log.log_every) == 0:
            self.reporter.stats_line(step, stats)
        if log.sample_every and step % int(log.sample_every) == 0:
            rows = int(log.sample_rows)
            self.reporter.sample_table(f"samples at step {step}", queries[:rows], texts[:rows], rewards[:rows])

    def finish(self) -> RunSummary:
        """Save ``final/``, print the before/after table, write report.md and curves.png (main process)."""
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()
        policy, reference = accelerator.unwrap_model(self.trainer.model), None
        if self.trainer.sharded:  # plain models on rank 0, from the gathered weights (a collective)
            policy, reference = sharded_state.models_for_finish(self.cfg, policy, self.state.is_main_process)
        comparison = None
        if self.state.is_main_process:
            save_final(policy, self.tokenizer, self.run_dir.final_dir)
            comparison = self._compare(policy, reference)
            monitor_lines = heldout_monitor_lines(self.monitors, comparison) if comparison is not None else []
            if comparison is not None:
                write_report(self.run_dir.root, comparison, self.loop.reward_means, monitor_lines)
            plot_curves(self.run_dir.metrics_path, self.run_dir.curves_path)
            for line in monitor_lines:
                self.reporter.print(line)
            self._print_summary(self.loop.reward_means, comparison)
        accelerator.wait_for_everyone()
        if self.trainer.launch.log_with:
            accelerator.end_training()
        return RunSummary(self.run_dir.root, self.steps, list(self.loop.reward_means), comparison)

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

    def _print_summary(self, reward_means: list[float], comparison: Comparison | None) -> None:
        reporter = self.reporter
        if comparison is not None:
            reporter.print(comparison_table(comparison))
        window = max(1, min(5, len(reward_means) // 4))
        if len(reward_means) >= 2 * window:
            first = sum(reward_means[:window]) / window
            last = sum(reward_means[-window:]) / window
            reporter.print(f"mean reward: first {window} steps {first:+.3f} → last {window} steps {last:+.3f}")
        reporter.print(f"run directory: [bold]{self.run_dir.root}[/]  (config.yaml, metrics.jsonl, final/, report.md, curves.png)")


def run_training(cfg: DictConfig, on_start: Optional[Callable[[Path], None]] = None) -> RunSummary:
    """Run (or continue) a whole training job described by a composed ``rlhf train`` config.

    ``on_start(run_dir)`` is called once the run has really started (see :class:`TrainingRun`).
    SIGTERM/SIGINT finish the current step, write a checkpoint and raise :class:`Preempted`.
    """
    run = TrainingRun(cfg, on_start)
    with run.reporter, StopRequest(announce=run.state.is_main_process) as stop:
        while run.loop.step < run.steps:
            run.train_step()
            saved = run.save_checkpoint() if run.checkpoint_due() else None
            if run.stop_requested(stop):
                saved = saved or run.save_checkpoint()
                raise Preempted(
                    f"{stop.name or 'a stop signal'} received; the run stopped after step {run.loop.step} of {run.steps} "
                    f"and wrote the checkpoint {saved}. Continue it with the same command plus "
                    f"`checkpoint.resume=auto output_dir={run.run_dir.root}`."
                )
    return run.finish()
