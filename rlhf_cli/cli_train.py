"""``rlhf train``: compose and validate every job once, then have Hydra run them.

``rlhf train`` parses the command line with Hydra's own parser, composes and validates the config of
every job (cheap, torch-free) so that a user mistake prints one paragraph of ours (exit code 2)
instead of Hydra's report, then has the same Hydra session run the jobs (its run, or its basic
sweeper and launcher with -m), which get the configs already composed
(:class:`rlhf_cli.config.compose.ComposeOnce`): one composition and one validation per job. Flags
that only print Hydra's own information (--hydra-help, --info, --shell-completion) and
--experimental-rerun go to a ``hydra.main`` app. The training engine is imported inside the Hydra
task, after the checks that need no model (:mod:`rlhf_cli.engine.preflight`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from rlhf_cli.console import PROG, print_error

# How long a process that does not print a job's error waits before exiting, so that the launcher
# (torchrun stops every process once one exits non-zero) does not stop the one that prints it first.
_QUIET_RANK_GRACE_S = 3.0


def _report_once(message: str, *, speaks: bool, prefix: str = "Error:") -> None:
    """Print ``message`` from the one process that speaks for the job; the others wait a moment (see
    :data:`_QUIET_RANK_GRACE_S`). Used for a mistake every process finds before the processes have met
    (rank 0 speaks), and for an error the processes agreed on (:mod:`rlhf_cli.engine.together`: the
    failing process speaks, the others hold a quiet :class:`~rlhf_cli.engine.together.PeerFailed`)."""
    if speaks:
        print_error(message, prefix=prefix)
    else:
        time.sleep(_QUIET_RANK_GRACE_S)

if TYPE_CHECKING:
    import argparse

    from hydra._internal.hydra import Hydra
    from omegaconf import DictConfig

# Flags of Hydra's argument parser, in the form they are given back to hydra.main.
_SWITCHES = {"help": "--help", "hydra_help": "--hydra-help", "resolve": "--resolve", "run": "--run",
             "multirun": "--multirun", "shell_completion": "--shell-completion"}
_VALUED = {"cfg": "--cfg", "package": "--package", "config_name": "--config-name", "config_dir": "--config-dir",
           "experimental_rerun": "--experimental-rerun", "info": "--info"}


def _hydra_argv(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """The command line hydra.main will parse (``--config-path`` is passed to hydra.main instead)."""
    argv = [flag for name, flag in _SWITCHES.items() if getattr(args, name)]
    argv += [f"{flag}={getattr(args, name)}" for name, flag in _VALUED.items() if getattr(args, name) is not None]
    return argv + list(overrides)


def _hydra_only(args: argparse.Namespace) -> bool:
    """Modes that print Hydra's own information and never run a job: no pre-validation."""
    return bool(args.hydra_help or args.shell_completion or args.info or args.experimental_rerun)


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """hydra.main reads sys.argv; give it ours for the duration of the call."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _job_label() -> str:
    """'Job 1 (seed=2): ' inside a multirun job, '' otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    return f"Job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): "


# Hydra's own output ---------------------------------------------------------------------------------
# train.yaml sets hydra.output_subdir=null and a job logging config without a file handler
# (configs/hydra/job_logging/console.yaml): Hydra would write .hydra/ and open train.log in the run
# directory before the job starts, so a start that fails (a bad model path, data file, reward,
# checkpoint) would replace an earlier run's copies. Instead the engine
# calls `JobStart.started` once the run has really started (everything built, the reward checked, the
# run directory written), and only then are .hydra/ and train.log written. Hydra callbacks
# (Callback.on_job_start) run before the task too, so they cannot know whether the start will succeed.
_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format


class JobStart:
    """One job's start: Hydra's output once it has started, and no stray directory if it fails before.

    ``created_roots``: run directory -> the outermost directory of its path that did not exist before
    `rlhf train` began (run directories that existed, or are not known, as for sweep jobs, are absent).
    """

    def __init__(self, task_cfg: DictConfig, created_roots: dict[Path, Path]) -> None:
        from hydra.core.hydra_config import HydraConfig

        self.hydra_cfg = HydraConfig.instance().cfg  # a {"hydra": ...} config, as Hydra saves it
        self.run_dir = Path(str(self.hydra_cfg.hydra.runtime.output_dir))
        self.task_cfg = task_cfg
        self.created_root = created_roots.get(self.run_dir)
        self.log_handler: logging.Handler | None = None

    def started(self, run_dir: Path) -> None:
        """Write .hydra/ (as Hydra would have) and start appending the job log to <run dir>/<job>.log."""
        from omegaconf import OmegaConf

        out = run_dir / ".hydra"
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.task_cfg, out / "config.yaml")
        OmegaConf.save(self.hydra_cfg, out / "hydra.yaml")
        OmegaConf.save(self.hydra_cfg.hydra.overrides.task, out / "overrides.yaml")
        handler = logging.FileHandler(run_dir / f"{self.hydra_cfg.hydra.job.name}.log", encoding="utf-8")
        fmt = OmegaConf.select(self.hydra_cfg, "hydra.job_logging.formatters.simple.format", default=_LOG_FORMAT)
        handler.setFormatter(logging.Formatter(str(fmt)))
        logging.getLogger().addHandler(handler)
        self.log_handler = handler

    def end(self) -> None:
        """After the job: detach the log file; if the run never started, remove the directories Hydra
        created for it (only empty ones, only those that did not exist before)."""
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
            return
        if self.created_root is None:
            return
        path = self.run_dir
        while path.is_relative_to(self.created_root):
            try:
                path.rmdir()  # fails on a non-empty directory: then something else lives there
            except OSError:
                return
            path = path.parent


def _run_train(cfg: DictConfig, on_start: Callable[[Path], None] | None) -> None:
    """``rlhf train``'s job: offline, every missing Hub download in one message; then the data files
    and the reward functions: all before torch and the engine load."""
    from rlhf_cli.engine.preflight import check_without_models
    from rlhf_cli.hub import check_offline_downloads

    check_offline_downloads(cfg)
    check_without_models(cfg)
    from rlhf_cli.engine.train import run_training

    run_training(cfg, on_start=on_start)


def _run_reward(cfg: DictConfig, on_start: Callable[[Path], None] | None) -> None:
    """``rlhf reward``'s job (rlhf_cli.engine.reward_train)."""
    from rlhf_cli.engine.reward_train import run_reward_training

    run_reward_training(cfg, on_start=on_start)


# A Hydra command: its name is also its primary config (configs/<name>.yaml); ``run`` does its job.
RUNNERS: dict[str, Callable[[DictConfig, Callable[[Path], None] | None], None]] = {"train": _run_train, "reward": _run_reward}


def _make_task(
    failures: list[int], created_roots: dict[Path, Path], rank: int, prevalidated: bool, command: str = "train"
) -> Callable[[DictConfig], None]:
    """The Hydra task of ``rlhf train`` (``rlhf reward`` with ``command``). User errors are printed and recorded in ``failures``, so a
    sweep goes on with its other jobs and the command still exits non-zero; other exceptions propagate
    to Hydra, which prints their traceback. ``created_roots``: run directory -> the outermost part of
    its path this command creates (see :class:`JobStart`). Only rank 0 writes Hydra's output.
    ``prevalidated``: every job's config was validated when the command line was composed (then the
    job only resolves it: one validation per run)."""
    import copy

    from rlhf_cli.config.compose import finalize
    from rlhf_cli.errors import RlhfError

    def train(cfg: DictConfig) -> None:
        job = JobStart(copy.deepcopy(cfg), created_roots)  # the composed config as Hydra saves it (unresolved)
        try:
            cfg = finalize(cfg, validate=not prevalidated, config_name=command)
            RUNNERS[command](cfg, job.started if rank == 0 else None)
        except RlhfError as err:
            failures.append(err.exit_code)
            _report_once(_job_label() + str(err), speaks=not err.quiet, prefix=err.label)
        finally:
            job.end()

    return train


def _created_root(run_dir: Path) -> Path | None:
    """The outermost directory of ``run_dir``'s path that does not exist yet (None if it exists)."""
    if run_dir.exists():
        return None
    root = run_dir
    while not root.parent.exists():
        root = root.parent
    return root


def _print_job_configs(args: argparse.Namespace, jobs: list[tuple[list[str], Any]]) -> None:
    """``--cfg job|hydra|all`` (also with ``-m``, which Hydra refuses): print each job's composed config.

    Done here rather than by Hydra so that ``--resolve`` works: a job's output_dir is Hydra's runtime
    directory, which Hydra only sets when the job runs; here it is set to the directory the job would get.
    """
    import os

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    sweep_dir = str(jobs[0][1].hydra.sweep.dir)  # evaluated once, like Hydra does for a whole sweep
    for number, (overrides, cfg) in enumerate(jobs):
        if args.resolve:
            OmegaConf.set_readonly(cfg.hydra, False)  # Hydra composes its node read-only; this copy is ours
            with open_dict(cfg):
                cfg.hydra.job.num = number
                run_dir = (os.path.join(sweep_dir, str(cfg.hydra.sweep.subdir)) if args.multirun
                           else str(cfg.hydra.run.dir))
                cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)
            HydraConfig.instance().set_config(cfg)  # what ${hydra:...} interpolations read
        if args.cfg == "job":
            with open_dict(cfg):
                del cfg["hydra"]
        elif args.cfg == "hydra":
            cfg = OmegaConf.create({"hydra": cfg.hydra})
        header = f"# job {number}: {' '.join(overrides)}\n" if args.multirun else ""
        if args.package:
            cfg = OmegaConf.select(cfg, args.package)
            header += f"# @package {args.package}\n"
        text = OmegaConf.to_yaml(cfg, resolve=args.resolve) if OmegaConf.is_config(cfg) else f"{cfg}\n"
        sys.stdout.write(header + text + ("\n" if args.multirun else ""))


def train_command(argv: list[str]) -> int:
    """``rlhf train [overrides] [hydra flags]``; returns the exit code."""
    return hydra_command(argv, "train")


def reward_command(argv: list[str]) -> int:
    """``rlhf reward [overrides] [hydra flags]``: train a reward model on preference pairs."""
    return hydra_command(argv, "reward")


def hydra_command(argv: list[str], command: str) -> int:
    """``rlhf COMMAND [overrides] [hydra flags]`` for a command of :data:`RUNNERS`; returns the exit code."""
    import os
    import tempfile

    from hydra._internal.utils import get_args_parser

    from rlhf_cli.config.compose import hydra_session, process_rank, rank_overrides, rewrite_output_dir
    from rlhf_cli.config.paths import config_dir
    from rlhf_cli.errors import ConfigError

    parser = get_args_parser()
    parser.prog = f"{PROG} {command}"
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after flags
    rank = process_rank()
    primary_dir = os.path.abspath(args.config_path) if args.config_path else str(config_dir())
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"rlhf-rank{rank}-")) if rank else ""
        try:
            overrides = rewrite_output_dir(args.overrides, multirun=args.multirun) + rank_overrides(rank, scratch)
            if _hydra_only(args):
                return _run_hydra_app(args, overrides, rank, primary_dir, command)
            hydra = stack.enter_context(hydra_session(primary_dir, args.config_dir, task_name=command))
            prepared = _checked_jobs(hydra, args, overrides, rank, primary_dir, command)
        except ConfigError as err:
            _report_once(str(err), speaks=rank == 0)  # every rank finds the same mistake: rank 0 says it
            return err.exit_code
        if prepared is None:  # --cfg or --help: printed, nothing to run
            return 0
        overrides, created_roots = prepared
        return _run_jobs(hydra, args, overrides, created_roots, rank, command)


def _checked_jobs(
    hydra: Hydra, args: argparse.Namespace, overrides: list[str], rank: int, primary_dir: str, command: str = "train"
) -> tuple[list[str], dict[Path, Path]] | None:
    """Compose and validate every job (ConfigError on the first mistake). With ``--help`` or ``--cfg``,
    print and return None; otherwise the overrides Hydra's run gets (the same ones: it composes nothing
    again) and the directories the run will create (see :class:`JobStart`)."""
    import os

    from rlhf_cli.config.compose import compose_jobs

    runs = not (args.cfg or args.help)
    if args.resolve and runs:
        from rlhf_cli.errors import ConfigError

        raise ConfigError(f"--resolve only goes with --cfg or --help: `{PROG} {command} --cfg job --resolve`.")
    # The run mode, as hydra.main adds it (a sweep's jobs need it to compose); a single run's --cfg and
    # --help print the config without it, as before.
    mode = ["hydra.mode=MULTIRUN"] if args.multirun else ["hydra.mode=RUN"] if runs else []
    overrides = overrides + mode
    jobs = compose_jobs(hydra, overrides, multirun=args.multirun, require_complete=runs, command=command,
                        config_name=args.config_name,
                        config_dirs=[d for d in (primary_dir, args.config_dir) if d])
    if args.help:
        _print_help(hydra, jobs[0][1], resolve=args.resolve)
        return None
    if args.cfg:
        _print_job_configs(args, jobs)
        return None
    if rank != 0 or args.multirun:
        return overrides, {}
    # The same config object Hydra's run gets: its ${now:...} directory is the one checked here.
    run_dir = Path(os.path.abspath(str(jobs[0][1].hydra.run.dir)))
    root = _created_root(run_dir)
    return overrides, ({run_dir: root} if root is not None else {})


def _print_help(hydra: Hydra, cfg: DictConfig, *, resolve: bool) -> None:
    """``--help``: Hydra's help page (the config's hydra.help template) of the composed config."""
    import copy

    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    job_cfg = hydra.get_sanitized_cfg(copy.deepcopy(cfg), "job")
    print(hydra.get_help(cfg.hydra.help, job_cfg, get_args_parser(), resolve=resolve))


def _run_jobs(
    hydra: Hydra, args: argparse.Namespace, overrides: list[str], created_roots: dict[Path, Path], rank: int,
    command: str,
) -> int:
    """Hydra's run (``-m``: its sweeper and launcher) of the checked jobs; the worst exit code."""
    from hydra._internal.utils import run_and_report

    failures: list[int] = []
    task = _make_task(failures, created_roots, rank, prevalidated=True, command=command)
    run = hydra.multirun if args.multirun else hydra.run
    try:  # a bug in a job: Hydra's report of the exception, exit code 1
        run_and_report(lambda: run(config_name=args.config_name or command, task_function=task, overrides=overrides))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return max(failures, default=0)


def _run_hydra_app(args: argparse.Namespace, overrides: list[str], rank: int, primary_dir: str, command: str = "train") -> int:
    """Hydra's own information (--hydra-help, --info, --shell-completion) or --experimental-rerun,
    through ``hydra.main``: Hydra composes, and a rerun job validates its config itself."""
    import hydra

    from rlhf_cli.config.store import register_configs

    register_configs()
    failures: list[int] = []
    task = _make_task(failures, {}, rank, prevalidated=False, command=command)
    app = hydra.main(config_path=primary_dir, config_name=command, version_base="1.3")(task)
    try:
        with _argv([f"{PROG} {command}", *_hydra_argv(args, overrides)]):
            app()
    except SystemExit as stop:  # Hydra exits after --help and after reporting an error itself
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return max(failures, default=0)
