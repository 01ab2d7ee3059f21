"""A reward model written by ``rlhf reward`` as a reward source (``reward=learned reward.model=RUN``).

It scores (prompt, response) exactly as it was trained to (``rlhf_cli.models.reward_scoring``: the same
text template and truncation, read from the model's ``reward_model.json``), and also answers the
question a labelling tool asks, the Bradley–Terry probability that one response beats another.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from rlhf_cli.errors import RewardError
from rlhf_cli.rewards.base import reward_texts

FINAL_DIR = "final"


def reward_model_dir(path: str | Path) -> Path:
    """The ``final/`` directory of a ``rlhf reward`` run given the run directory or that ``final/``
    directory itself; a RewardError (one paragraph) for anything else."""
    from rlhf_cli.models.reward_scoring import RULE_FILE

    given = Path(path).expanduser()
    for candidate in (given, given / FINAL_DIR):
        if (candidate / RULE_FILE).is_file() and (candidate / "config.json").is_file():
            return candidate.resolve()
    if not given.exists():
        problem = "does not exist"
    elif (given / "config.yaml").is_file() and not (given / FINAL_DIR).is_dir():
        problem = "is a run directory without a final/ model (the run did not finish; resume it to completion)"
    else:
        problem = f"holds no reward model (no {RULE_FILE} beside a config.json, in it or in its final/)"
    raise RewardError(
        f"The learned reward model '{path}' {problem}. Give the output_dir of a finished `rlhf reward` run, or its "
        f"final/ directory, e.g. `rlhf reward output_dir=runs/rm` then reward=learned reward.model=runs/rm."
    )


class LearnedReward:
    """A trained scalar reward model. ``__call__(prompts, responses) -> list[float]`` (the engine's reward
    protocol); :meth:`preference_probability` gives σ(r(a) − r(b)) per row.

    ``device="auto"``: this process's CUDA device if there is one, else the CPU.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 32, device: str = "auto", config_prefix: str = "reward") -> None:
        import torch
        from transformers import AutoTokenizer

        from rlhf_cli.models.reward_scoring import (
            SEQUENCE_CLASSIFICATION,
            ScoringRule,
            load_saved_reward_model,
        )

        self.path = reward_model_dir(path)
        self.batch_size = int(batch_size)
        if device == "auto":
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            self.rule = ScoringRule.load(self.path)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            with torch.random.fork_rng(devices=[]):  # loading must not move the run's random stream
                self.model = load_saved_reward_model(self.path, self.rule.head)
        except (OSError, ValueError, KeyError) as err:
            raise RewardError(
                f"The learned reward model in {self.path} ({config_prefix}.model) cannot be loaded: "
                f"{type(err).__name__}: {err}. It may be a partial copy; train it again with `rlhf reward`."
            ) from err
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.rule.head == SEQUENCE_CLASSIFICATION and self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id  # a decoder classifier's pooling reads it
        self.model.to(self.device).eval()

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Scores of whole texts (prompt + response already joined, or rendered by a chat template)."""
        from rlhf_cli.models.reward_scoring import score_texts

        return score_texts(self.model, self.tokenizer, texts, self.rule, batch_size=self.batch_size, device=self.device)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.score_texts(reward_texts(prompts, responses, "full"))

    def preference_probability(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        """P(a ≻ b) = σ(r(prompt, a) − r(prompt, b)) for each row."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(
                f"prompts, responses_a and responses_b must have the same length, got "
                f"{len(prompts)}, {len(responses_a)} and {len(responses_b)}"
            )
        scores_a = self(prompts, responses_a)
        scores_b = self(prompts, responses_b)
        # σ(d) = (1 + tanh(d/2)) / 2: no overflow for large |d|.
        return [0.5 * (1.0 + math.tanh((a - b) / 2.0)) for a, b in zip(scores_a, scores_b)]

    def __repr__(self) -> str:
        return f"learned(model={self.path})"


def load_learned_reward(path: str | Path, **options: Any) -> LearnedReward:
    """The learned reward in ``path``: a ``rlhf reward`` run directory or its ``final/`` directory.

    ``options``: ``batch_size`` (texts per forward pass), ``device`` ("auto", "cpu", "cuda:N").
    """
    return LearnedReward(path, **options)
