"""Held-out evaluation of a reward on preference pairs: pair accuracy ± SE and mean margin.

The same numbers for the trained model, the untrained one (the backbone with its fresh head) and any
reward source the ``reward`` group offers (e.g. VADER), on the same held-out pairs, so a user sees
whether the learned model beats a hand-made judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlhf_cli.data.preferences import PreferencePairs, PreferenceRows
from rlhf_cli.models.reward_scoring import VALUE_HEAD
from rlhf_cli.summary_stats import standard_error


@dataclass
class PairScore:
    """One reward's result on the held-out pairs."""

    name: str
    accuracy: float
    accuracy_se: float
    margin: float
    margin_se: float
    pairs: int

    def line(self) -> str:
        return (f"{self.name}: held-out pair accuracy {100 * self.accuracy:.1f} % ± {100 * self.accuracy_se:.1f} "
                f"(mean margin {self.margin:+.3f} ± {self.margin_se:.3f}, {self.pairs} pairs)")


def pair_score(name: str, chosen: Sequence[float], rejected: Sequence[float], ties: Sequence[bool] | None = None) -> PairScore:
    """Accuracy (a pair counts 1 if r(chosen) > r(rejected), ½ on equal scores) and margin over the
    untied pairs, each with the standard error of its mean."""
    keep = [i for i in range(len(chosen)) if not (ties and ties[i])]
    correct = [1.0 if chosen[i] > rejected[i] else 0.5 if chosen[i] == rejected[i] else 0.0 for i in keep]
    margins = [chosen[i] - rejected[i] for i in keep]
    mean = lambda values: sum(values) / max(1, len(values))  # noqa: E731
    return PairScore(name, mean(correct), standard_error(correct), mean(margins), standard_error(margins), len(keep))


def score_model_on_pairs(name: str, model: Any, tokenizer: Any, pairs: PreferencePairs, *, batch_size: int, device: Any,
                         head: str = VALUE_HEAD) -> PairScore:
    """A reward model's result on tokenised pairs (eval mode, no gradients); ``head`` as in ``scoring``."""
    from rlhf_cli.models.reward_scoring import pad_id_of, score_ids

    was_training = model.training
    model.eval()
    scores = score_ids(model, pairs.chosen_ids + pairs.rejected_ids, pad_id_of(tokenizer), head=head,
                       batch_size=batch_size, device=device)
    model.train(was_training)
    return pair_score(name, scores[: len(pairs)], scores[len(pairs):], pairs.ties)


def score_reward_on_pairs(name: str, reward_fn: Callable, rows: PreferenceRows, ties: Sequence[bool] | None = None) -> PairScore:
    """A reward function's result on the pairs as text (each side scored as (prompt, response))."""
    from rlhf_cli.rewards import score_responses

    chosen = score_responses(reward_fn, rows.chosen_prompts, rows.chosen).tolist()
    rejected = score_responses(reward_fn, rows.rejected_prompts, rows.rejected).tolist()
    return pair_score(name, chosen, rejected, ties)


def report_markdown(results: list[PairScore], *, steps: int, pairs: int) -> str:
    """report.md of a ``rlhf reward`` run."""
    lines = [
        "# Reward model: held-out preference accuracy",
        "",
        f"Trained {steps} steps on {pairs} pairs. Accuracy: the fraction of held-out pairs where r(chosen) > "
        "r(rejected) (equal scores count ½); margin: mean r(chosen) − r(rejected); ± one standard error of the mean.",
        "",
        "| reward | held-out pair accuracy | mean margin | pairs |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {100 * r.accuracy:.1f} % ± {100 * r.accuracy_se:.1f} | {r.margin:+.3f} ± {r.margin_se:.3f} | {r.pairs} |")
    return "\n".join(lines) + "\n"
