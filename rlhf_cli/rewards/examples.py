"""Example reward functions for ``reward.type=callable`` (see docs; also used by the tests).

A callable reward takes the decoded prompts and responses of a batch, plus any ``reward.kwargs``
as keyword arguments, and returns one number per sample::

    rlhf train reward.type=callable reward.function=rlhf_cli.rewards.examples:length_penalty \
        ++reward.kwargs.target_words=20
"""

from __future__ import annotations

from typing import Sequence


def length_penalty(prompts: Sequence[str], responses: Sequence[str], target_words: int = 12) -> list[float]:
    """Minus the distance, in words, between each response's length and ``target_words`` (best: 0)."""
    return [-float(abs(len(response.split()) - target_words)) for response in responses]


def keyword_bonus(prompts: Sequence[str], responses: Sequence[str], keywords: Sequence[str] = ("great",)) -> list[float]:
    """How many times the ``keywords`` occur in each response (whole words, case-insensitive)."""
    wanted = {keyword.lower() for keyword in keywords}
    return [float(sum(word.strip(".,!?;:\"'()").lower() in wanted for word in response.split())) for response in responses]
