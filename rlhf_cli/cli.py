"""The ``rlhf`` command: subcommand dispatch and the small subcommands (``rlhf train`` is
:mod:`rlhf_cli.cli_train`).

Nothing heavy is imported at module level: ``rlhf --help`` and ``rlhf recipes`` never import torch,
and Hydra is imported only by ``rlhf train``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from rlhf_cli.cli_train import reward_command, train_command
from rlhf_cli.console import PROG, print_error

__all__ = ["COMMANDS", "PROG", "main", "print_error"]


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
        if not err.quiet:
            print_error(err, prefix=err.label)
        return err.exit_code
    except KeyboardInterrupt:
        print_error("interrupted.", prefix="Stopped:")
        return 130
