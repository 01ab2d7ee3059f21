"""VADER lexicon sentiment: a reward that needs no model and no network."""

from __future__ import annotations

from typing import Sequence

from rlhf_cli.errors import RewardError
from rlhf_cli.rewards.base import REWARD_TEXTS, reward_texts


class VaderReward:
    """VADER compound sentiment in [-1, 1] of the response (``text="response"``) or of prompt + response (``"full"``)."""

    def __init__(self, text: str = "response", config_prefix: str = "reward") -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        if text not in REWARD_TEXTS:
            raise RewardError(f"{config_prefix}.text={text} is not a VADER text mode; use one of {', '.join(REWARD_TEXTS)}.")
        self.text = text
        # Loads the ~7,500-word lexicon shipped in the vaderSentiment wheel (tens of ms): once per reward.
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in reward_texts(prompts, responses, self.text)]

    def __repr__(self) -> str:
        return f"vader(text={self.text})"
