"""How a reward model scores a text: written once, used by training, evaluation and the learned reward.

The rule (saved with the model as ``reward_model.json`` so a loader applies it unchanged):

* the text is ``prompt + response`` concatenated as written (``rewards.base.reward_texts(..., "full")``,
  what ``rlhf train`` hands a reward), rendered by the chat template for conversational data;
* it is tokenised without special tokens added, and a text longer than ``max_length`` tokens keeps its
  *last* ``max_length`` tokens (the response, which decides the preference, sits at the end);
* the batch is left-padded with position ids counted from each text's first real token, so a text's
  score does not depend on what it is batched with;
* the score is the scalar head on the last hidden state of the last token.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

RULE_FILE = "reward_model.json"
RULE_FORMAT = 1


@dataclass(frozen=True)
class ScoringRule:
    """What ``reward_model.json`` records: the truncation length and the text template."""

    max_length: int
    template: str = "prompt+response"
    truncation: str = "keep_last"
    format: int = RULE_FORMAT

    def save(self, directory: Path) -> None:
        (Path(directory) / RULE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "ScoringRule":
        data = json.loads((Path(directory) / RULE_FILE).read_text(encoding="utf-8"))
        return cls(**{key: data[key] for key in ("max_length", "template", "truncation", "format") if key in data})


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text (no special tokens added; longer ones keep their last ``max_length``
    tokens) and whether each was truncated."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    truncated = [len(ids) > max_length for ids in encoded]
    return [ids[-max_length:] if cut else ids for ids, cut in zip(encoded, truncated)], truncated


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu") -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` [N, L] of left-padded ``sequences``."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, longest - len(ids):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def sequence_scores(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Scores [N] float32 of a left-padded batch: the value head at the last position.

    ``model`` is a value-head causal LM (``AutoModelForCausalLMWithValueHead``, possibly wrapped by
    Accelerate); ``logits_to_keep=1`` spares the language-model head every other position.
    """
    with warnings.catch_warnings():
        # The value-head wrapper passes past_key_values=None, which transformers 5 flags as deprecated.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        _, _, values = model(**batch, logits_to_keep=1)
    return values[:, -1]


def score_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], rule: ScoringRule, *,
                batch_size: int = 32, device: Any = "cpu") -> list[float]:
    """Scores of ``texts`` under ``rule``, in batches, without gradients (eval mode is the caller's)."""
    ids, _ = encode_texts(tokenizer, texts, rule.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = left_padded(ids[start:start + batch_size], pad_id, device)
            scores.extend(sequence_scores(model, batch).float().cpu().tolist())
    return scores
