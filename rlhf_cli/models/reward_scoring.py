"""How a reward model scores a text: written once, used by training, evaluation and the learned reward.

It sits in ``models/``, below both users: ``rlhf reward`` (``rlhf_cli.reward_model``, which trains and
evaluates a model under this rule) and the ``learned`` reward source (``rlhf_cli.rewards.learned``, which
reads the rule a trained model was saved with and loads the model, :func:`load_saved_reward_model`).

The rule (saved with the model as ``reward_model.json`` so a loader applies it unchanged):

* the text is ``prompt + response`` concatenated as written (``rewards.base.reward_texts(..., "full")``,
  what ``rlhf train`` hands a reward), rendered by the chat template for conversational data;
* a text longer than ``max_length`` tokens keeps its *last* tokens (the response, which decides the
  preference, sits at the end);
* the rest depends on the backbone (``head``), as :data:`HEAD_RULES` states:

  - ``value_head`` (a causal LM with a scalar head): no special tokens added; the batch is left-padded
    with position ids counted from each text's first real token; the score is the head on the last
    token's hidden state;
  - ``sequence_classification`` (``AutoModelForSequenceClassification``, one label): the tokenizer's own
    special tokens (e.g. BERT's [CLS] ... [SEP], Llama's BOS) wrap the kept tokens, as the backbone was
    pre-trained; the batch is right-padded (an encoder pools position 0, its [CLS]) and the score is the
    model's own pooled logit: the last token that is not the pad token for a decoder (GPT-2, Llama:
    ``config.pad_token_id`` is set to the tokenizer's pad token), the first token for an encoder.

Either way a text's score does not depend on what it is batched with.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

RULE_FILE = "reward_model.json"
RULE_FORMAT = 2  # 2 added ``head``; a format-1 file (no head) is a value-head model
VALUE_HEAD = "value_head"
SEQUENCE_CLASSIFICATION = "sequence_classification"


@dataclass(frozen=True)
class HeadRule:
    """What differs between the two kinds of backbone: padding side, special tokens, which score is read."""

    padding_side: str
    special_tokens: bool
    reads: str


HEAD_RULES = {
    VALUE_HEAD: HeadRule("left", False, "the value head on the last token's hidden state"),
    SEQUENCE_CLASSIFICATION: HeadRule(
        "right", True, "the model's pooled logit: last non-pad token (decoders) or first token (encoders)"),
}


@dataclass(frozen=True)
class ScoringRule:
    """What ``reward_model.json`` records: the truncation length, the text template and the backbone kind."""

    max_length: int
    template: str = "prompt+response"
    truncation: str = "keep_last"
    head: str = VALUE_HEAD
    format: int = RULE_FORMAT

    def __post_init__(self) -> None:
        if self.head not in HEAD_RULES:
            raise ValueError(f"head must be one of {tuple(HEAD_RULES)}, got {self.head!r}")

    @property
    def head_rule(self) -> HeadRule:
        return HEAD_RULES[self.head]

    def save(self, directory: Path) -> None:
        # The head's padding side, special tokens and read position are written too, for a reader of
        # the file; loading derives them from ``head`` (one source).
        record = {**asdict(self), **asdict(self.head_rule)}
        (Path(directory) / RULE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> ScoringRule:
        data = json.loads((Path(directory) / RULE_FILE).read_text(encoding="utf-8"))
        return cls(**{key: data[key] for key in ("max_length", "template", "truncation", "head", "format") if key in data})


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, head: str = VALUE_HEAD
                 ) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text under ``head``'s rule (longer ones keep their last tokens, inside the special
    tokens where the rule adds them: at most ``max_length`` in all) and whether each was truncated."""
    texts = list(texts)
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if not HEAD_RULES[head].special_tokens:
        truncated = [len(ids) > max_length for ids in plain]
        return [ids[-max_length:] if cut else ids for ids, cut in zip(plain, truncated)], truncated
    wrapped = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    encoded, truncated = [], []
    for ids, full in zip(plain, wrapped):
        prefix, suffix = _special_ends(ids, full)
        room = max(max_length - len(prefix) - len(suffix), 0)
        truncated.append(len(ids) > room)
        encoded.append(prefix + (ids[len(ids) - room:] if room else []) + suffix)
    return encoded, truncated


def _special_ends(plain: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer put before and after ``plain`` to make ``full``."""
    extra = len(full) - len(plain)
    for start in range(max(extra, 0) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    # A tokenizer whose special tokens change the text's own tokens: keep them all in front.
    return full[:max(extra, 0)], []


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


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu") -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` [N, L] of right-padded ``sequences`` (the model's own
    position ids then count from each text's first token)."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def padded_batch(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu", head: str = VALUE_HEAD) -> dict[str, Tensor]:
    """The model inputs of ``sequences`` padded on ``head``'s side."""
    padded = left_padded if HEAD_RULES[head].padding_side == "left" else right_padded
    return padded(sequences, pad_id, device)


def sequence_scores(model: torch.nn.Module, batch: dict[str, Tensor], head: str = VALUE_HEAD) -> Tensor:
    """Scores [N] float32 of a batch made by :func:`padded_batch` for ``head``.

    ``value_head``: a value-head causal LM (``AutoModelForCausalLMWithValueHead``, possibly wrapped by
    Accelerate); ``logits_to_keep=1`` spares the language-model head every other position.
    ``sequence_classification``: the classifier's one logit.
    """
    if head == SEQUENCE_CLASSIFICATION:
        return model(**batch).logits[:, 0].float()
    with warnings.catch_warnings():
        # The value-head wrapper passes past_key_values=None, which transformers 5 flags as deprecated.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        _, _, values = model(**batch, logits_to_keep=1)
    return values[:, -1]


def score_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], rule: ScoringRule, *,
                batch_size: int = 32, device: Any = "cpu") -> list[float]:
    """Scores of ``texts`` under ``rule``, in batches, without gradients (eval mode is the caller's)."""
    ids, _ = encode_texts(tokenizer, texts, rule.max_length, rule.head)
    return score_ids(model, ids, pad_id_of(tokenizer), head=rule.head, batch_size=batch_size, device=device)


def score_ids(model: torch.nn.Module, ids: Sequence[Sequence[int]], pad_id: int, *, head: str, batch_size: int,
              device: Any = "cpu") -> list[float]:
    """Scores of token sequences, in batches, without gradients."""
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = padded_batch(ids[start:start + batch_size], pad_id, device, head)
            scores.extend(sequence_scores(model, batch, head).float().cpu().tolist())
    return scores


def pad_id_of(tokenizer: Any) -> int:
    """The id a batch is padded with (masked out; 0 for a tokenizer without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def load_saved_reward_model(path: Path, head: str) -> torch.nn.Module:
    """A reward model's ``final/`` directory as ``head`` says, in float32 (load errors are the caller's to word)."""
    from rlhf_cli.models.model_facts import dtype_kwargs

    if head == VALUE_HEAD:
        from rlhf_cli.models.value_head import AutoModelForCausalLMWithValueHead

        return AutoModelForCausalLMWithValueHead.from_pretrained(str(path), **dtype_kwargs(torch.float32))
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), **dtype_kwargs(torch.float32))
