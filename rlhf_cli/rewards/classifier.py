"""A text-classification model as the reward: the logit (or probability) of one of its labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from rlhf_cli.errors import ModelLoadError, RewardError
from rlhf_cli.hub import check_loadable, hub_failure_message
from rlhf_cli.rewards.base import REWARD_TEXTS, reward_texts

if TYPE_CHECKING:
    import torch

CLASSIFIER_OUTPUTS = ("logit", "probability")


class ClassifierReward:
    """Scores texts with ``AutoModelForSequenceClassification`` loaded from ``model`` (local dir or Hub id).

    The score of a text is the raw logit of ``label`` (``output="logit"``) or its softmax probability
    (``output="probability"``). Texts are the responses or prompt + response (``text``), scored in
    batches of ``batch_size``, truncated to ``max_length`` tokens, under ``no_grad`` in eval mode.
    ``device="auto"`` is this process's current CUDA device if there is one, else the CPU.
    ``config_prefix`` is the config node these arguments came from, named in error messages.
    """

    def __init__(
        self,
        model: str,
        label: str = "POSITIVE",
        output: str = "logit",
        batch_size: int = 16,
        device: str = "auto",
        max_length: int = 512,
        text: str = "response",
        config_prefix: str = "reward",
    ) -> None:
        _check_options(output, batch_size, max_length, text, config_prefix)
        self.model_name = model
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length
        self.text = text
        self.device = _resolve_device(device, config_prefix)
        self.tokenizer, self.model = _load(model, config_prefix)
        self.model.to(self.device).eval()
        self.label, self.label_index = _find_label(self.model.config.id2label, label, model, config_prefix)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = reward_texts(prompts, responses, self.text)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores.extend(self.score_texts(texts[start : start + self.batch_size]).tolist())
        return scores

    def score_texts(self, texts: list[str]) -> "torch.Tensor":
        """Scores of one batch of texts: float32 [len(texts)], on the CPU."""
        import torch

        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            logits = self.model(**encoded).logits.float()  # [b, num_labels]
        if self.output == "probability":
            logits = logits.softmax(dim=-1)
        return logits[:, self.label_index].cpu()

    def __repr__(self) -> str:
        return f"classifier(model={self.model_name}, label={self.label}, output={self.output}, text={self.text})"


def _check_options(output: str, batch_size: int, max_length: int, text: str, prefix: str) -> None:
    if output not in CLASSIFIER_OUTPUTS:
        raise RewardError(f"{prefix}.output={output} is not a classifier output; use one of {', '.join(CLASSIFIER_OUTPUTS)}.")
    if text not in REWARD_TEXTS:
        raise RewardError(f"{prefix}.text={text} is not a text mode; use one of {', '.join(REWARD_TEXTS)}.")
    if batch_size < 1:
        raise RewardError(f"{prefix}.batch_size={batch_size} must be >= 1 (texts per classifier forward pass).")
    if max_length < 1:
        raise RewardError(f"{prefix}.max_length={max_length} must be >= 1 (truncation length in tokens).")


def _resolve_device(device: str, prefix: str) -> "torch.device":
    import torch

    if device == "auto":
        # The current CUDA device, not cuda:0: under `accelerate launch` each rank has set its own.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise RewardError(f"{prefix}.device={device} is not a device; use auto, cpu, cuda or cuda:N.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RewardError(f"{prefix}.device={device} asks for CUDA, which this machine does not have; use auto or cpu.")
    return resolved


def _load(name: str, prefix: str) -> tuple:
    """(tokenizer, model) from ``name``; a missing path or unreachable Hub id is a ModelLoadError."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.models.model_facts import dtype_kwargs

    config_key = f"{prefix}.model"
    check_loadable(name, what="reward classifier", config_key=config_key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, **dtype_kwargs(torch.float32))
    except (OSError, ValueError) as err:
        raise ModelLoadError(hub_failure_message(name, what="reward classifier", config_key=config_key, error=err)) from err
    if tokenizer.pad_token is None:
        # Decoder-style classifiers (GPT-2) ship without a pad token; batching needs one, and the
        # attention mask makes its identity irrelevant, so reuse EOS as everyone does.
        if tokenizer.eos_token is None:
            raise RewardError(
                f"The tokenizer of the reward classifier '{name}' has neither a pad nor an eos token, so "
                f"texts cannot be padded into batches. Save the tokenizer with a pad_token (or eos_token) and "
                f"point {prefix}.model at that directory."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _find_label(id2label: dict, label: str, name: str, prefix: str) -> tuple[str, int]:
    """(the model's spelling of ``label``, its output index), matching case-insensitively."""
    for index, model_label in sorted(id2label.items()):
        if str(model_label).lower() == label.lower():
            return str(model_label), int(index)
    labels = ", ".join(str(model_label) for _, model_label in sorted(id2label.items()))
    raise RewardError(
        f"The reward classifier '{name}' has no label '{label}' ({prefix}.label); its labels are {labels}. "
        f"Set {prefix}.label to one of them."
    )
