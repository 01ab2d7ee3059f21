"""``rlhf label SOURCE [PROMPT ...] --out FILE``: collect preferences between two responses, one key each.

Everything that can be refused is checked before any model loads, in this order: the keys (a
terminal, or ``--script``), FILE (readable, in the preference format, writable), the reward model,
the options; then the pairs are generated, those already in FILE (and pairs whose two responses are
the same) dropped, the rest ordered and shown. FILE is touched only by the first judgement.
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf_cli.label.pairs import Pair, ShownPair, left_is_a
from rlhf_cli.label.records import LabelError, LabelFile, check_writable, pair_key, read_labelled
from rlhf_cli.label.selection import SELECTIONS, pair_probabilities, uncertainty_order
from rlhf_cli.label.sources import AGAINST

DESCRIPTION = (
    "Show a prompt and two responses side by side and record which one you prefer with a single key: "
    "1 / 2 (left / right is better), t (tie), s (skip), u (undo), q (quit). Every judgement is appended to "
    "FILE at once (the format `rlhf reward` reads); running again with the same FILE continues where you "
    "stopped. SOURCE is a run of `rlhf train` (its directory, final/ or a checkpoints/step-N: two samples of "
    "its policy, or --against reference), or a prompts file (.txt or .jsonl) with --models A B."
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("source", metavar="SOURCE", help="a run directory / final/ / checkpoints/step-N, or a prompts file")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to label (default: the run's held-out prompts)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the preference file (.jsonl) to append to")
    parser.add_argument("--against", choices=AGAINST, default="policy",
                        help="a run's policy against a second sample of itself (default) or its starting model")
    parser.add_argument("--models", nargs=2, metavar=("A", "B"),
                        help="with a prompts file: the two models to compare (runs or model directories)")
    parser.add_argument("--prompts", dest="num_prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest response (default: the run's generation.response_max_tokens)")
    parser.add_argument("--labeller", default=None, metavar="NAME", help="your name, stored with each judgement")
    parser.add_argument("--reward-model", default=None, metavar="RUN",
                        help="a run of `rlhf reward`: show its agreement with you after each judgement")
    parser.add_argument("--select", choices=SELECTIONS, default="order",
                        help="order: pairs in prompt order (default); uncertain: those the reward model is least sure of first")
    parser.add_argument("--script", default=None, metavar="FILE", help="replay keys from FILE instead of the terminal")
    return parser


def _check_options(args: argparse.Namespace) -> None:
    source = Path(args.source).expanduser()
    if args.models and not source.is_file():
        raise LabelError(f"--models A B compares two models on a prompts file, but SOURCE {args.source} is not a file.")
    if source.is_file() and not args.models:
        raise LabelError(
            f"SOURCE {args.source} is a file: give the two models to compare with --models A B (runs of `rlhf train` "
            "or model directories), or give a run directory as SOURCE to compare two samples of its policy."
        )
    if args.models and args.against != "policy":
        raise LabelError("--against reference applies to a run SOURCE; with --models the two models are given.")
    if args.select == "uncertain" and not args.reward_model:
        raise LabelError("--select uncertain orders pairs by a reward model's uncertainty: give --reward-model RUN too.")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise LabelError(f"--prompts must be at least 1, got {args.num_prompts}.")


def _candidates(args: argparse.Namespace) -> list[Pair]:
    from rlhf_cli.label.sources import model_pairs, run_pairs

    options = dict(seed=args.seed, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens)
    if args.models:
        return model_pairs(args.source, args.models, args.prompts, **options)
    return run_pairs(args.source, args.prompts, against=args.against, **options)


def new_pairs(candidates: Sequence[Pair], labelled_rows: Sequence[dict[str, Any]]) -> list[Pair]:
    """The candidates to show: not in the file already, not repeated, and with two different responses."""
    seen = {pair_key(row["prompt"], row["chosen"], row["rejected"]) for row in labelled_rows}
    fresh = []
    for pair in candidates:
        if pair.response_a != pair.response_b and pair.key not in seen:
            seen.add(pair.key)
            fresh.append(pair)
    return fresh


def _shown_pairs(pairs: list[Pair], *, seed: int, reward_model: Any, select: str) -> list[ShownPair]:
    """The pairs in the order they will be shown, each with its left/right order and model probability."""
    probabilities: list[Optional[float]] = [None] * len(pairs)
    if reward_model is not None:
        probabilities = pair_probabilities(reward_model, [p.prompt for p in pairs], [p.response_a for p in pairs],
                                           [p.response_b for p in pairs])
    order = uncertainty_order(probabilities) if select == "uncertain" else range(len(pairs))
    return [ShownPair(pairs[i], left_is_a(pairs[i], seed), probabilities[i]) for i in order]


def label_command(argv: list[str], prog: str = "rlhf label") -> int:
    """``rlhf label``; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    from rlhf_cli.label.keys import ScriptKeys, TerminalKeys, read_script, require_terminal

    if args.script is None:
        require_terminal()
    else:
        read_script(args.script)  # unreadable: refused before anything loads
    out = Path(args.out).expanduser()
    labelled = read_labelled(out)
    check_writable(out)
    _check_options(args)
    from rich.console import Console

    console = Console()
    console.print(f"Loading the models and sampling the pairs of {args.source} (a moment on a CPU)...", style="dim",
                  markup=False, highlight=False)
    reward_model = _load_reward_model(args.reward_model)
    session = _build_session(args, out, labelled, reward_model)
    if not session.pending:
        console.print(f"No pairs left to label: every candidate pair is already in {out} (or its two responses are "
                      "the same). Draw new pairs with another --seed or more prompts.", markup=False, highlight=False,
                      soft_wrap=True)
        return 0
    with ScriptKeys(args.script) if args.script is not None else TerminalKeys() as keys:
        result = session.run(keys, console)
    from rlhf_cli.label.screen import session_summary

    agreement = session.agreement.summary() if session.agreement is not None else None
    console.print(session_summary(result.written, len(labelled) + result.written, result.skipped, result.remaining,
                                  str(out), agreement), markup=False, highlight=False, soft_wrap=True)
    return 0


def _load_reward_model(path: Optional[str]) -> Any:
    if path is None:
        return None
    import transformers

    from rlhf_cli.rewards.learned import load_learned_reward, reward_model_dir

    reward_model_dir(path)  # a path that is no reward model: refused before the policies load
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar above the screen
    return load_learned_reward(path)


def _build_session(args: argparse.Namespace, out: Path, labelled: list[dict], reward_model: Any):
    import transformers

    from rlhf_cli.label.selection import Agreement
    from rlhf_cli.label.session import LabelSession

    transformers.utils.logging.disable_progress_bar()
    candidates = _candidates(args)
    pairs = new_pairs(candidates, labelled)
    seed = 0 if args.seed is None else int(args.seed)
    shown = _shown_pairs(pairs, seed=seed, reward_model=reward_model, select=args.select)
    agreement = Agreement() if reward_model is not None else None
    session = LabelSession(deque(shown), LabelFile(out), len(labelled), labeller=args.labeller, agreement=agreement)
    identical = sum(pair.response_a == pair.response_b for pair in candidates)
    if identical:  # e.g. a policy that has barely moved from its reference, with common random numbers
        session.status = f"left out {identical} of {len(candidates)} pairs whose two responses are identical"
    return session
