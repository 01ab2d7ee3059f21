"""A candidate pair (a prompt and two responses with their sources), the left/right order it is shown
in, and the row a judgement of it becomes (see :mod:`rlhf_cli.label.records` for the row's keys)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from rlhf_cli.label.records import pair_key

JUDGEMENT_KEYS = ("1", "2", "t")  # left better, right better, tie


@dataclass(frozen=True)
class ResponseSource:
    """Where a response came from: a model (``final``, ``checkpoint step-N``, ``reference`` or a
    directory name), its path, its training step (None when unknown) and the sampling seed."""

    model: str
    path: str
    step: Optional[int]
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pair:
    """One prompt and two responses to it, a and b, as generated (before any shuffling)."""

    prompt: str
    response_a: str
    response_b: str
    source_a: ResponseSource
    source_b: ResponseSource

    @property
    def key(self) -> str:
        return pair_key(self.prompt, self.response_a, self.response_b)


@dataclass(frozen=True)
class ShownPair:
    """A pair as the person sees it: which of a and b stands on the left.

    ``probability_a``: the reward model's P(a ≻ b), when there is one.
    """

    pair: Pair
    left_is_a: bool
    probability_a: Optional[float] = None

    @property
    def left(self) -> str:
        return self.pair.response_a if self.left_is_a else self.pair.response_b

    @property
    def right(self) -> str:
        return self.pair.response_b if self.left_is_a else self.pair.response_a


def left_is_a(pair: Pair, seed: int) -> bool:
    """The left/right order of ``pair``: a fair coin drawn from the pair and the session seed, so the
    order does not follow the source (a is not always the policy) and a resumed session shows a pair
    the same way."""
    return random.Random(f"{seed}:{pair.key}").random() < 0.5


def judgement_row(shown: ShownPair, key: str, *, labeller: Optional[str]) -> dict[str, Any]:
    """The row a judgement (``key`` in :data:`JUDGEMENT_KEYS`) of ``shown`` is written as."""
    if key not in JUDGEMENT_KEYS:
        raise ValueError(f"not a judgement key: {key!r}")
    pair = shown.pair
    chosen_is_left = key != "2"  # "1" and a tie ("t", written in the order shown) put the left first
    chosen_is_a = chosen_is_left == shown.left_is_a
    chosen, rejected = (pair.response_a, pair.response_b) if chosen_is_a else (pair.response_b, pair.response_a)
    chosen_source, rejected_source = (pair.source_a, pair.source_b) if chosen_is_a else (pair.source_b, pair.source_a)
    row: dict[str, Any] = {
        "prompt": pair.prompt,
        "chosen": chosen,
        "rejected": rejected,
        "tie": key == "t",
        "pair_id": pair.key,
        "shown": ["chosen", "rejected"] if chosen_is_left else ["rejected", "chosen"],
        "key": key,
        "chosen_source": chosen_source.as_dict(),
        "rejected_source": rejected_source.as_dict(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "labeller": labeller,
    }
    if shown.probability_a is not None:
        row["reward_model_probability"] = shown.probability_a if chosen_is_a else 1.0 - shown.probability_a
    return row
