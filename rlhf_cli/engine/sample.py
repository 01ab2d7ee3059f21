"""``rlhf sample``: generate from a run's policy (final, a checkpoint, or the starting model) and score it.

It is how a user looks at what training did: the same prompts, generation settings, tokenizer and
reward as the run (all read from the run's config), so ``rlhf sample RUN --reference`` and
``rlhf sample RUN`` with the same seed differ only by the weights. Each of P prompts is sampled n
times; the summary is the mean reward over the N = P × n samples with its standard error
(sample standard deviation / √N, treating the samples as independent).

What ``RUN_DIR_OR_CHECKPOINT`` may be:

* a run directory (the ``output_dir`` of ``rlhf train``): its ``final/`` model;
* a run's ``final/`` directory;
* a checkpoint ``<run>/checkpoints/step-N/``: the policy as it was after step N;
* any of these with ``--reference``: the starting model, rebuilt from the config (what the run's
  reference model was).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.errors import RlhfError
from rlhf_cli.summary_stats import standard_error


@dataclass(frozen=True)
class SampleTarget:
    """Which weights to sample from, and the config of the run they belong to."""

    label: str  # shown above the table: "final", "checkpoint step-20", "reference"
    cfg: DictConfig
    final_dir: Path | None = None  # load the policy saved there
    checkpoint: Path | None = None  # rebuild from cfg.model and load this checkpoint's weights
    # Neither: the starting model, built from cfg.model.


@dataclass
class Samples:
    """P prompts × n samples each: the rows of the table (prompt-major order) and their rewards."""

    label: str
    prompts: list[str]
    responses: list[str]
    rewards: list[float]
    samples_per_prompt: int
    # Tokens each response generated (re-encoding the decoded text need not give the same count:
    # byte-level BPE can decode a partial UTF-8 character, and encoding picks its own merges).
    response_tokens: list[int] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) // max(1, self.samples_per_prompt)

    @property
    def mean(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def standard_error(self) -> float:
        """Sample standard deviation (ddof 1) / √N; 0 for a single sample."""
        return standard_error(self.rewards)

    def summary(self) -> str:
        """The one-line result, e.g. ``mean reward +0.231 ± 0.041 (standard error) over 128 samples (32 prompts × 4)``."""
        return (
            f"{self.label}: mean reward {self.mean:+.3f} ± {self.standard_error:.3f} (standard error) over "
            f"{len(self.rewards)} samples ({self.num_prompts} prompts × {self.samples_per_prompt})"
        )


# Finding what to sample from ------------------------------------------------------------------------
def _run_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RlhfError(
            f"{run_dir} is not a run directory: it has no config.yaml. Give the output_dir of an `rlhf train` run, "
            "its final/ directory, or one of its checkpoints/step-N directories."
        )
    return OmegaConf.load(path)


def resolve_target(path: str | Path, *, reference: bool = False) -> SampleTarget:
    """What ``path`` (a run directory, its ``final/``, or a checkpoint) and ``--reference`` ask to sample."""
    given = Path(path).expanduser()
    where = given.resolve()
    if not where.exists():
        raise RlhfError(
            f"{given} does not exist. Give the output_dir of an `rlhf train` run, its final/ directory, or one "
            "of its checkpoints/step-N directories."
        )
    if not where.is_dir():
        raise RlhfError(f"{given} is a file; give a run directory, its final/ directory, or a checkpoints/step-N directory.")
    if ckpt.checkpoint_step(where) is not None and where.parent.name == ckpt.CHECKPOINTS_DIR:
        _, cfg = ckpt.read_checkpoint(where)  # checks it is complete
        if reference:
            return SampleTarget("reference (starting model)", cfg)
        return SampleTarget(f"checkpoint {where.name}", cfg, checkpoint=where)
    if where.name == "final" and (where.parent / "config.yaml").is_file():
        where = where.parent
    cfg = _run_config(where)
    if reference:
        return SampleTarget("reference (starting model)", cfg)
    final_dir = where / "final"
    if not (final_dir / "config.json").is_file():
        found = ckpt.list_checkpoints(where)
        hint = f" or sample its newest checkpoint: `rlhf sample {found[-1]}`" if found else ""
        raise RlhfError(
            f"{where} has no final/ model: the run has not finished. Continue it with `rlhf train ... "
            f"checkpoint.resume=auto output_dir={where}`{hint}, or give --reference for the starting model."
        )
    return SampleTarget("final", cfg, final_dir=final_dir)


# Loading --------------------------------------------------------------------------------------------
def load_target(target: SampleTarget) -> tuple[Any, Any]:
    """The value-head policy and tokenizer of ``target`` (dropout disabled, as during the run's rollouts)."""
    from transformers import AutoTokenizer

    from rlhf_cli.engine.evaluate import _trained_policy
    from rlhf_cli.models import load_policy_and_tokenizer

    cfg = target.cfg
    if target.final_dir is not None:
        # final/ holds the policy and the tokenizer the run used (pad token included): no need for the
        # original model files, which may have moved since.
        policy = _trained_policy(target.final_dir, str(cfg.model.kind))
        tokenizer = AutoTokenizer.from_pretrained(str(target.final_dir))
        tokenizer.padding_side = str(cfg.model.padding_side)
        return policy, tokenizer
    policy, tokenizer = load_policy_and_tokenizer(cfg.model, disable_dropout=True)
    if target.checkpoint is not None:
        ckpt.load_weights(target.checkpoint, policy)
    return policy, tokenizer


def heldout_prompts(cfg: DictConfig, tokenizer: Any, limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of the run's held-out prompts (the first ``limit`` of them, all if None)."""
    from rlhf_cli.data.prompts import build_prompt_data

    heldout = build_prompt_data(cfg.dataset, tokenizer, seed=int(cfg.seed)).heldout
    count = len(heldout) if limit is None else min(int(limit), len(heldout))
    if count < 1:
        raise RlhfError(
            f"The run has no held-out prompts (dataset.eval_size={cfg.dataset.eval_size}); give prompts on the "
            "command line: `rlhf sample RUN \"The movie was\" ...`."
        )
    rows = heldout.select(range(count))
    return [list(ids) for ids in rows["input_ids"]], list(rows["query"])


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompts given on the command line, tokenised as the run's prompts are (no special tokens added)."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    empty = [repr(text) for text, row in zip(prompts, ids) if not row]
    if empty:
        raise RlhfError(f"These prompts tokenise to nothing: {', '.join(empty)}. Give prompts with some text.")
    return [list(row) for row in ids]


# Sampling -------------------------------------------------------------------------------------------
def _check_counts(samples_per_prompt: int, max_new_tokens: int | None) -> None:
    if samples_per_prompt < 1:
        raise RlhfError(f"--n must be at least 1 (samples per prompt), got {samples_per_prompt}.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise RlhfError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")


def generate_and_score(
    policy: Any,
    tokenizer: Any,
    cfg: DictConfig,
    prompt_ids: list[list[int]],
    prompts: list[str],
    *,
    samples_per_prompt: int,
    seed: int,
    max_new_tokens: int | None,
    label: str,
) -> Samples:
    """Sample every prompt ``samples_per_prompt`` times with the run's generation settings and score
    each (prompt, response) with the run's reward (see :func:`generate_texts`)."""
    from rlhf_cli.rewards import build_reward, score_responses

    decoded, lengths = generate_texts(policy, tokenizer, cfg, prompt_ids, samples_per_prompt=samples_per_prompt,
                                      seed=seed, max_new_tokens=max_new_tokens)
    texts = [text for text in prompts for _ in range(samples_per_prompt)]
    rewards = score_responses(build_reward(cfg.reward), texts, decoded).tolist()
    return Samples(label, texts, decoded, rewards, samples_per_prompt, lengths)


def generate_texts(
    policy: Any,
    tokenizer: Any,
    cfg: DictConfig,
    prompt_ids: list[list[int]],
    *,
    samples_per_prompt: int,
    seed: int,
    max_new_tokens: int | None,
) -> tuple[list[str], list[int]]:
    """Decoded responses (prompt-major: the n samples of a prompt are adjacent) and the tokens each
    generated, with the run's generation settings. The RNG is forked and seeded, so the same seed and
    prompts give the same samples, and two models are compared on common random numbers."""
    import torch

    from rlhf_cli.engine.heldout import model_generation_settings
    from rlhf_cli.rollout.generation import generate_responses

    _check_counts(samples_per_prompt, max_new_tokens)
    budget = int(cfg.generation.response_max_tokens) if max_new_tokens is None else int(max_new_tokens)
    generation = model_generation_settings(cfg, tokenizer, policy)
    queries = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids for _ in range(samples_per_prompt)]
    # One GPU if there is one (generation dominates the cost); the samples then differ from the CPU's.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        responses = generate_responses(policy, queries, max_new_tokens=budget, device=device, **generation)
    return tokenizer.batch_decode(responses, skip_special_tokens=True), [len(r) for r in responses]


def sample_run(
    path: str | Path,
    prompts: Sequence[str] = (),
    *,
    reference: bool = False,
    samples_per_prompt: int = 1,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    num_prompts: int | None = None,
) -> Samples:
    """``rlhf sample``: resolve ``path``, load its model, sample the given (or held-out) prompts, score them.

    ``seed`` defaults to the run's seed; ``max_new_tokens`` to the run's ``generation.response_max_tokens``;
    ``num_prompts`` limits the held-out prompts (all of them by default).
    """
    import torch
    import transformers

    _check_counts(samples_per_prompt, max_new_tokens)  # before anything loads
    if num_prompts is not None and num_prompts < 1:
        raise RlhfError(f"--prompts must be at least 1 (held-out prompts to use), got {num_prompts}.")
    target = resolve_target(path, reference=reference)
    if target.cfg.threads:
        torch.set_num_threads(int(target.cfg.threads))
    transformers.utils.logging.disable_progress_bar()
    policy, tokenizer = load_target(target)
    if prompts:
        prompt_ids, texts = encode_prompts(tokenizer, prompts), list(prompts)
    else:
        prompt_ids, texts = heldout_prompts(target.cfg, tokenizer, num_prompts)
    return generate_and_score(
        policy,
        tokenizer,
        target.cfg,
        prompt_ids,
        texts,
        samples_per_prompt=samples_per_prompt,
        seed=int(target.cfg.seed) if seed is None else int(seed),
        max_new_tokens=max_new_tokens,
        label=target.label,
    )


def samples_table(samples: Samples):
    """The samples as a rich table: prompt, response, reward (the n samples of a prompt together)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"rlhf sample: {samples.label}", expand=True, title_justify="left")
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("response", ratio=5, overflow="fold")
    table.add_column("reward", justify="right", no_wrap=True)
    for index, (prompt, response, reward) in enumerate(zip(samples.prompts, samples.responses, samples.rewards)):
        first_of_prompt = index % samples.samples_per_prompt == 0
        table.add_row(escape(prompt) if first_of_prompt else "", escape(response), f"{reward:+.3f}",
                      end_section=(index + 1) % samples.samples_per_prompt == 0 and samples.samples_per_prompt > 1)
    return table
