"""The run directory's and the checkpoint's checks at the start of ``rlhf train``, before any model loads.

What :class:`rlhf_cli.engine.train.TrainingRun` learns here: the run directory (refused if it holds an
earlier run and neither ``checkpoint.resume`` nor ``overwrite`` says what to do with it), the
checkpoint to continue from (read, trainer state included, and checked against this config and launch),
``ppo.precision=auto`` resolved once (a continued run keeps its checkpoint's), and the metrics lines a
continued run keeps. Nothing is written yet: the run directory is created only once the run has started.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from accelerate import PartialState
from omegaconf import DictConfig

from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.engine.components import with_resolved_precision
from rlhf_cli.engine.divergence import DivergenceWatch
from rlhf_cli.engine.run_dir import RunDirectory
from rlhf_cli.reporting import Reporter


class StartChecks(NamedTuple):
    """What the checks found, for the run to keep."""

    cfg: DictConfig  # with ppo.precision resolved
    run_dir: RunDirectory
    watch: DivergenceWatch
    reporter: Reporter  # prints the checks' notices; replaced by the run's own once it has started
    resume: ckpt.ResumePoint | None
    resumed_metrics: list[str]  # the metrics.jsonl lines a continued run keeps (main process)


def check_run_start(cfg: DictConfig, state: PartialState) -> StartChecks:
    """The run directory and the checkpoint to resume from, checked (see the module docstring)."""
    run_dir = RunDirectory(Path(cfg.output_dir), is_main=state.is_main_process)
    watch = DivergenceWatch(cfg, run_dir.root, is_main=state.is_main_process)
    reporter = Reporter(total_steps=0, enabled=state.is_main_process, progress=False)
    # The checkpoint is read (trainer state included) and checked before any model loads.
    resume, notices = ckpt.find_resume_point(cfg.checkpoint.resume, run_dir.root, state.process_index)
    continuing = run_dir.check_start(
        resume_from=resume.path if resume else None,
        resume=cfg.checkpoint.resume,
        overwrite=bool(cfg.overwrite),
    )
    for notice in notices:  # after the refusal: "starting a fresh run" must not precede one
        reporter.print(notice)
    # ppo.precision=auto becomes this device's precision (a resumed run's: its checkpoint's), once.
    cfg = with_resolved_precision(cfg, state.device.type, resume and resume.config, reporter.print)
    if resume is not None:
        ckpt.check_resumable(resume, cfg, state.num_processes, reporter.print)
    resumed_metrics: list[str] = []
    if continuing and state.is_main_process:
        resumed_metrics, notice = run_dir.resumed_metrics(resume.step)
        if notice:
            reporter.print(notice)
    return StartChecks(cfg, run_dir, watch, reporter, resume, resumed_metrics)
