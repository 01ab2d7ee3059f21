"""The ``rlhf`` command: subcommand dispatch, ``rlhf train`` (a Hydra app) and ``rlhf recipes``.

Nothing heavy is imported at module level: ``rlhf --help`` and ``rlhf recipes`` never import torch,
and Hydra is imported only by ``rlhf train``. The training engine is imported inside the Hydra task.

``rlhf train`` first composes and validates the config of every job itself (cheap), so that a user
mistake prints one paragraph of ours (exit code 2) instead of Hydra's report, and only then hands the
command line to a ``hydra.main`` app, which keeps every Hydra flag working (--cfg, --help, -m, --info,
hydra.run.dir=...).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import argparse

    from omegaconf import DictConfig

PROG = "rlhf"


def print_error(message: object, *, prefix: str = "Error:") -> None:
    """One paragraph on stderr, with a red prefix; rich must not hard-wrap it or read it as markup."""
    from rich.console import Console
    from rich.text import Text

    text = Text(f"{prefix} ", style="bold red")
    text.append(" ".join(str(message).split()))
    Console(stderr=True).print(text, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# rlhf train
# ---------------------------------------------------------------------------------------------------

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
    from rlhf_cli.hub import check_offline_downloads

    # Offline, every missing Hub download in one message, before torch and the engine load.
    check_offline_downloads(cfg)
    from rlhf_cli.engine.train import run_training

    run_training(cfg, on_start=on_start)


def _run_reward(cfg: DictConfig, on_start: Callable[[Path], None] | None) -> None:
    from rlhf_cli.engine.reward_train import run_reward_training

    run_reward_training(cfg, on_start=on_start)


def _make_task(
    failures: list[int], created_roots: dict[Path, Path], rank: int, config_name: str = "train",
    run: Callable[[DictConfig, Callable[[Path], None] | None], None] = _run_train,
) -> Callable[[DictConfig], None]:
    """The Hydra task of ``rlhf train`` (or of ``rlhf reward``: ``config_name`` and ``run``). User errors
    are printed and recorded in ``failures``, so a
    sweep goes on with its other jobs and the command still exits non-zero; other exceptions propagate
    to Hydra, which prints their traceback. ``created_roots``: run directory -> the outermost part of
    its path this command creates (see :class:`JobStart`). Only rank 0 writes Hydra's output."""
    import copy

    from rlhf_cli.config.compose import finalize
    from rlhf_cli.errors import RlhfError

    def train(cfg: DictConfig) -> None:
        job = JobStart(copy.deepcopy(cfg), created_roots)  # the composed config as Hydra saves it (unresolved)
        try:
            cfg = finalize(cfg, config_name=config_name)
            run(cfg, job.started if rank == 0 else None)
        except RlhfError as err:
            failures.append(err.exit_code)
            print_error(_job_label() + str(err), prefix=err.label)
        finally:
            job.end()

    return train


def _pin_run_dir(overrides: list[str], run_dir: Path) -> list[str]:
    """``overrides`` with hydra.run.dir set to ``run_dir``: the directory Hydra creates is then the one
    whose prior existence was checked (a ``${now:...}`` in it would otherwise be evaluated again)."""
    kept = [line for line in overrides if line.split("=", 1)[0].lstrip("+") != "hydra.run.dir"]
    quoted = "'" + str(run_dir).replace("'", "\\'") + "'"
    return kept + [f"hydra.run.dir={quoted}"]


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
    return _hydra_command(argv, command="train", run=_run_train)


def reward_command(argv: list[str]) -> int:
    """``rlhf reward [overrides] [hydra flags]``: train a reward model on preference pairs."""
    return _hydra_command(argv, command="reward", run=_run_reward)


def _hydra_command(argv: list[str], *, command: str, run: Callable) -> int:
    """A Hydra command whose primary config is configs/<command>.yaml; returns the exit code."""
    import os
    import tempfile

    import hydra
    from hydra._internal.utils import get_args_parser

    from rlhf_cli.config.compose import compose_jobs, process_rank, rank_overrides, rewrite_output_dir
    from rlhf_cli.config.paths import config_dir
    from rlhf_cli.config.store import register_configs
    from rlhf_cli.errors import ConfigError

    parser = get_args_parser()
    parser.prog = f"{PROG} {command}"
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after flags
    rank = process_rank()
    created_roots: dict[Path, Path] = {}
    primary_dir = os.path.abspath(args.config_path) if args.config_path else str(config_dir())
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"rlhf-rank{rank}-")) if rank else ""
        try:
            overrides = rewrite_output_dir(args.overrides, multirun=args.multirun) + rank_overrides(rank, scratch)
            if not _hydra_only(args):
                jobs = compose_jobs(
                    overrides,
                    multirun=args.multirun,
                    require_complete=not (args.cfg or args.help),
                    config_name=args.config_name or command,
                    extra_config_dir=args.config_dir,
                    primary_dir=primary_dir,
                )
                if args.cfg and not args.help:
                    _print_job_configs(args, jobs)
                    return 0
                if rank == 0 and not args.multirun and not args.help:
                    run_dir = Path(os.path.abspath(str(jobs[0][1].hydra.run.dir)))
                    overrides = _pin_run_dir(overrides, run_dir)
                    root = _created_root(run_dir)
                    created_roots = {run_dir: root} if root is not None else {}
        except ConfigError as err:
            if rank == 0:  # every rank finds the same mistake; say it once
                print_error(err)
            return err.exit_code
        register_configs()
        failures: list[int] = []
        task = _make_task(failures, created_roots, rank, args.config_name or command, run)
        app = hydra.main(config_path=primary_dir, config_name=command, version_base="1.3")(task)
        try:
            with _argv([f"{PROG} {command}", *_hydra_argv(args, overrides)]):
                app()
        except SystemExit as stop:  # Hydra exits after --help and after reporting an error itself
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return max(failures, default=0)


# ---------------------------------------------------------------------------------------------------
# rlhf recipes
# ---------------------------------------------------------------------------------------------------


def recipes_command(argv: list[str]) -> int:
    """``rlhf recipes``: a table of recipe names and their one-line descriptions."""
    from rich.console import Console
    from rich.table import Table

    from rlhf_cli.config.paths import recipe_description, recipe_files, reward_recipe_files
    from rlhf_cli.errors import ConfigError

    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} recipes\n\nList the recipes usable as `{PROG} train +recipe=NAME`.")
        return 0
    if argv:
        raise ConfigError(f"`{PROG} recipes` takes no arguments (got: {' '.join(argv)}).")
    table = Table(title="Recipes: rlhf train +recipe=NAME [overrides...]", title_justify="left")
    table.add_column("Recipe", style="bold cyan", no_wrap=True)
    table.add_column("Description")
    for name, path in recipe_files().items():
        table.add_row(name, recipe_description(path))
    Console().print(table)
    reward_table = Table(title="Recipes: rlhf reward +recipe=NAME [overrides...]", title_justify="left")
    reward_table.add_column("Recipe", style="bold cyan", no_wrap=True)
    reward_table.add_column("Description")
    for name, path in reward_recipe_files().items():
        reward_table.add_row(name, recipe_description(path))
    Console().print(reward_table)
    return 0


# ---------------------------------------------------------------------------------------------------
# rlhf eval / rlhf export / rlhf sample
# ---------------------------------------------------------------------------------------------------


def eval_command(argv: list[str]) -> int:
    """``rlhf eval RUN_DIR [--prompts N]``: before/after table of a finished run; writes report.md, curves.png."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"{PROG} eval", description=eval_command.__doc__)
    parser.add_argument("run_dir", help="the output_dir of a finished `rlhf train` run")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts to compare (default: the run's eval_prompts)")
    args = parser.parse_args(argv)
    from rich.console import Console

    from rlhf_cli.engine.evaluate import evaluate_run
    from rlhf_cli.engine.report import comparison_table

    comparison = evaluate_run(args.run_dir, prompts=args.prompts)
    console = Console()
    console.print(comparison_table(comparison))
    console.print(f"wrote {args.run_dir}/report.md and {args.run_dir}/curves.png")
    return 0


def export_command(argv: list[str]) -> int:
    """``rlhf export CHECKPOINT OUT``: a checkpoint as a plain Hugging Face model directory."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"{PROG} export", description=export_command.__doc__)
    parser.add_argument("checkpoint", help="a checkpoints/step-N directory, or a run directory (its newest checkpoint)")
    parser.add_argument("out", help="new directory to write (AutoModelForCausalLM.from_pretrained loads it)")
    args = parser.parse_args(argv)
    from pathlib import Path

    import transformers

    from rlhf_cli.engine.export import export_checkpoint

    transformers.utils.logging.disable_progress_bar()  # no tqdm bar per saved shard
    source = export_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"exported {source} -> {args.out}")
    return 0


def sample_command(argv: list[str]) -> int:
    """``rlhf sample RUN_DIR_OR_CHECKPOINT [PROMPT ...]``: generate from a run's model and score it."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"{PROG} sample",
        description="Generate from a run's final/ model (or a checkpoints/step-N directory, or --reference for the "
        "starting model) with the run's generation settings, tokenizer and reward; print prompt, response and "
        "reward, and the mean reward ± its standard error.",
    )
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (its final/ model), its final/ directory, or a checkpoints/step-N directory")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to continue (default: the run's held-out prompts)")
    parser.add_argument("--reference", action="store_true", help="sample the starting model (the run's reference) instead")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest response, in new tokens (default: the run's generation.response_max_tokens)")
    parser.add_argument("--prompts", dest="num_prompts", type=int, default=None,
                        help="use only the first N held-out prompts (default: all of them)")
    args = parser.parse_args(argv)
    from rich.console import Console

    from rlhf_cli.engine.sample import sample_run, samples_table

    samples = sample_run(
        args.target,
        args.prompts,
        reference=args.reference,
        samples_per_prompt=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        num_prompts=args.num_prompts,
    )
    console = Console()
    console.print(samples_table(samples))
    console.print(samples.summary(), markup=False, highlight=False)
    return 0


def label_command(argv: list[str]) -> int:
    """``rlhf label SOURCE [PROMPT ...] --out FILE``: record which of two responses a person prefers."""
    from rlhf_cli.label.command import label_command as run_label

    return run_label(argv, prog=f"{PROG} label")


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (train_command, "fine-tune a model with PPO (Hydra overrides: key=value, group=option, +recipe=NAME)"),
    "reward": (reward_command, "train a reward model on preference pairs (Bradley–Terry; same overrides as train)"),
    "recipes": (recipes_command, "list the recipes with a one-line description each"),
    "eval": (eval_command, "before/after table of a finished run on held-out prompts (writes report.md, curves.png)"),
    "export": (export_command, "write a checkpoint as a plain Hugging Face model directory"),
    "sample": (sample_command, "generate from a run's final/ model, a checkpoint or the reference, with rewards"),
    "label": (label_command, "show two responses side by side and record which you prefer (a preference file)"),
}


def _help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"{PROG}: fine-tune transformer language models with PPO from a reward signal.",
        "",
        f"usage: {PROG} <command> [arguments...]",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help  show this message",
        "  --version   show the version",
        "",
        f"`{PROG} train --help` lists the config groups and every key; `{PROG} train --cfg job` prints the composed config.",
        f"examples: {PROG} train | {PROG} train +recipe=imdb_sentiment | {PROG} train -m ppo.init_kl_coef=0.1,0.2",
    ]
    return "\n".join(lines)


def _version() -> str:
    from rlhf_cli import __version__

    return f"{PROG} (rlhf-cli) {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlhf`` console script and of ``python -m rlhf_cli``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help_text())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    from rlhf_cli.errors import RlhfError

    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print_error(
            f"Unknown command '{name}'." + (f" Did you mean '{close[0]}'?" if close else "")
            + f" Commands: {', '.join(COMMANDS)}. Run `{PROG} --help` for details."
        )
        return 2
    command, _ = COMMANDS[name]
    try:
        return command(rest)
    except RlhfError as err:
        print_error(err, prefix=err.label)
        return err.exit_code
    except KeyboardInterrupt:
        print_error("interrupted.", prefix="Stopped:")
        return 130
