"""Where the pairs come from: generate two responses per prompt with ``rlhf sample``'s machinery.

* a run of ``rlhf train`` (its directory, ``final/`` or a ``checkpoints/step-N``): two samples of its
  policy (seeds s and s + 1), or with ``--against reference`` the policy against its starting model
  (both with seed s, so they differ only by the weights);
* a prompts file (``.txt``: one prompt a line; ``.jsonl``: a ``prompt`` string per row) and two models
  A and B, each a run (as above) or a plain Hugging Face model directory (``rlhf export``'s output).

Each model generates with its run's generation settings and tokenizer (a plain model directory with
the defaults of ``rlhf train``); prompts default to the run's held-out prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from rlhf_cli.errors import RlhfError
from rlhf_cli.label.pairs import Pair, ResponseSource
from rlhf_cli.label.records import LabelError

AGAINST = ("policy", "reference")
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


@dataclass
class Generator:
    """A loaded model ready to sample: what it is (for the rows' sources), its run config, weights, tokenizer."""

    model: str
    path: Path
    step: Optional[int]
    cfg: DictConfig
    policy: Any
    tokenizer: Any

    def responses(self, prompts: Sequence[str], prompt_ids: Optional[list[list[int]]], *, seed: int,
                  max_new_tokens: Optional[int]) -> tuple[list[str], ResponseSource]:
        """One response per prompt (``prompt_ids``: the run's own ids of held-out prompts, else encoded here)."""
        from rlhf_cli.engine.sample import encode_prompts, generate_texts

        ids = prompt_ids if prompt_ids is not None else encode_prompts(self.tokenizer, prompts)
        texts, _ = generate_texts(self.policy, self.tokenizer, self.cfg, ids, samples_per_prompt=1, seed=seed,
                                  max_new_tokens=max_new_tokens)
        return texts, ResponseSource(self.model, str(self.path), self.step, seed)


# Loading ----------------------------------------------------------------------------------------------
def _final_step(run_dir: Path) -> Optional[int]:
    """The last step in the run's metrics.jsonl: the step its final/ model was saved at."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (ValueError, KeyError, TypeError):
        return None


def _load(what: str, load: Any) -> Any:
    """Run ``load()``; a model that does not load becomes one paragraph naming it."""
    from safetensors import SafetensorError  # a truncated or corrupt weights file

    try:
        return load()
    except RlhfError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise LabelError(
            f"The model {what} cannot be loaded: {type(err).__name__}: {' '.join(str(err).split())[:300]}. Check that it "
            "is a complete run of `rlhf train` (or a model directory written by save_pretrained / `rlhf export`)."
        ) from None


def run_generator(path: str | Path, *, reference: bool = False) -> Generator:
    """The policy of a run (final/ or a checkpoint), or its starting model with ``reference``."""
    import torch

    from rlhf_cli.engine import checkpoint as ckpt
    from rlhf_cli.engine.sample import load_target, resolve_target

    target = resolve_target(path, reference=reference)
    if "dataset" not in target.cfg and "optim" in target.cfg:  # the config of an `rlhf reward` run
        raise LabelError(
            f"{path} is a run of `rlhf reward`: a reward model, which scores responses but writes none. Pass it as "
            f"--reward-model {path}; the responses to label come from a run of `rlhf train` (SOURCE), or from two "
            "models (a prompts file as SOURCE with --models A B)."
        )
    where = Path(path).expanduser().resolve()
    if target.cfg.threads:
        torch.set_num_threads(int(target.cfg.threads))
    policy, tokenizer = _load(str(path), lambda: load_target(target))
    if reference:
        step: Optional[int] = 0
        label = "reference"
    elif target.checkpoint is not None:
        step, label = ckpt.checkpoint_step(target.checkpoint), target.label
    else:
        step, label = _final_step(target.final_dir.parent), "final"
        where = target.final_dir
    return Generator(label, where, step, target.cfg, policy, tokenizer)


def _is_run(path: Path) -> bool:
    return any((p / "config.yaml").is_file() for p in (path, path.parent)) or path.parent.name == "checkpoints"


def model_generator(path: str | Path) -> Generator:
    """Model A or B of a prompts-file session: a run (its policy) or a plain model directory."""
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.models import load_policy_and_tokenizer

    where = Path(path).expanduser().resolve()
    if where.is_dir() and _is_run(where):
        return run_generator(where)
    if not (where / "config.json").is_file():
        raise LabelError(
            f"--models {path} is neither a run of `rlhf train` (a directory with config.yaml, its final/, or a "
            "checkpoints/step-N) nor a model directory (with config.json, as save_pretrained and `rlhf export` write)."
        )
    quoted = "'" + str(where).replace("\\", "\\\\").replace("'", "\\'") + "'"
    cfg = compose_train_config(["model=local", f"model.name_or_path={quoted}"], require_complete=False)
    policy, tokenizer = _load(str(path), lambda: load_policy_and_tokenizer(cfg.model, disable_dropout=True))
    return Generator(where.name, where, None, cfg, policy, tokenizer)


# Prompts --------------------------------------------------------------------------------------------
def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts of a ``.txt`` file (one a non-empty line) or a ``.jsonl`` file (a ``prompt`` string a row)."""
    given = Path(path).expanduser()
    if given.suffix not in PROMPT_FILE_SUFFIXES:
        raise LabelError(f"The prompts file {given} must end in .txt (one prompt a line) or .jsonl (a prompt string a row).")
    try:
        lines = given.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LabelError(f"The prompts file {given} cannot be read ({err}). Give a UTF-8 text file.") from None
    if given.suffix == ".txt":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = [_jsonl_prompt(given, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise LabelError(f"The prompts file {given} holds no prompts.")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise LabelError(f"Line {number} of the prompts file {path} is not a JSON object with a string 'prompt'.")
    return row["prompt"]


# Pairs ------------------------------------------------------------------------------------------------
def _zip_pairs(prompts: Sequence[str], a: tuple[list[str], ResponseSource], b: tuple[list[str], ResponseSource]) -> list[Pair]:
    return [Pair(prompt, ra, rb, a[1], b[1]) for prompt, ra, rb in zip(prompts, a[0], b[0])]


def run_pairs(path: str | Path, prompts: Sequence[str], *, against: str, seed: Optional[int],
              num_prompts: Optional[int], max_new_tokens: Optional[int]) -> list[Pair]:
    """One pair per prompt from a run: two policy samples, or the policy against the reference."""
    from rlhf_cli.engine.sample import heldout_prompts

    policy = run_generator(path)
    seed = int(policy.cfg.seed) if seed is None else int(seed)
    if prompts:
        texts, ids = list(prompts)[:num_prompts], None
    else:
        ids, texts = heldout_prompts(policy.cfg, policy.tokenizer, num_prompts)
    first = policy.responses(texts, ids, seed=seed, max_new_tokens=max_new_tokens)
    if against == "reference":
        other = run_generator(path, reference=True)
        return _zip_pairs(texts, first, other.responses(texts, ids, seed=seed, max_new_tokens=max_new_tokens))
    return _zip_pairs(texts, first, policy.responses(texts, ids, seed=seed + 1, max_new_tokens=max_new_tokens))


def model_pairs(prompts_file: str | Path, models: Sequence[str], prompts: Sequence[str], *, seed: Optional[int],
                num_prompts: Optional[int], max_new_tokens: Optional[int]) -> list[Pair]:
    """One pair per prompt of the file (and of ``prompts``): model A's response against model B's."""
    texts = (read_prompts_file(prompts_file) + list(prompts))[:num_prompts]
    sides = []
    for path in models:
        generator = model_generator(path)
        chosen_seed = int(generator.cfg.seed) if seed is None else int(seed)
        sides.append(generator.responses(texts, None, seed=chosen_seed, max_new_tokens=max_new_tokens))
        del generator  # one model in memory at a time
    return _zip_pairs(texts, sides[0], sides[1])
