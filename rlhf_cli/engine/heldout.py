"""The held-out evaluation: generation settings of a run, the before/after comparison, report.md.

One path shared by the end of ``rlhf train`` (:meth:`TrainingRun.finish`), ``rlhf eval`` (which
rebuilds "before" from the run's config) and ``rlhf sample`` (which reuses the generation settings
and the token-id rule): the same prompts, lengths, sampling and seed wherever a run is evaluated.
Imports nothing of the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from rlhf_cli.engine.report import Comparison, compare_before_after, report_markdown


def generation_settings(cfg: DictConfig, *, pad_token_id: int, eos_token_id: int | None, is_encoder_decoder: bool) -> dict[str, Any]:
    """Keyword arguments for :func:`~rlhf_cli.rollout.generation.generate_responses` (budgets excluded)."""
    gen = cfg.generation
    return dict(
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        is_encoder_decoder=is_encoder_decoder,
        batch_size=gen.batch_size,
        do_sample=bool(gen.do_sample),
        top_k=int(gen.top_k),
        top_p=float(gen.top_p),
        temperature=float(gen.temperature),
    )


def model_generation_settings(cfg: DictConfig, tokenizer: Any, model: Any) -> dict[str, Any]:
    """:func:`generation_settings` for a value-head ``model`` and its tokenizer (the shared token-id rule)."""
    from rlhf_cli.ppo.inputs import token_ids  # torch: imported when a model exists anyway
    pad, eos = token_ids(tokenizer, getattr(model, "config", None))
    return generation_settings(cfg, pad_token_id=pad, eos_token_id=eos, is_encoder_decoder=model.is_encoder_decoder)


def compare_on_heldout(
    cfg: DictConfig,
    heldout: Any,
    rows: int,
    *,
    before_model: Any,
    after_model: Any,
    tokenizer: Any,
    reward_fn: Any,
    generation: dict[str, Any],
    device: Any,
) -> Comparison:
    """Both models on the first ``rows`` held-out prompts, the longest response length and the run's seed."""
    import torch

    selected = heldout.select(range(rows))
    return compare_before_after(
        before_model=before_model,
        after_model=after_model,
        prompt_ids=[torch.tensor(ids, dtype=torch.long) for ids in selected["input_ids"]],
        prompts=list(selected["query"]),
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        generation=dict(generation, max_new_tokens=int(cfg.generation.response_max_tokens)),
        seed=int(cfg.seed),
        device=device,
    )


def write_report(run_dir: Path, comparison: Comparison, reward_means: Sequence[float], extra_lines: Sequence[str] = ()) -> None:
    """``report.md`` of the run in ``run_dir``; ``extra_lines`` (e.g. the monitors' before/after) go below its summary."""
    text = report_markdown(comparison, title=f"rlhf_cli run {run_dir.name}", reward_means=list(reward_means))
    if extra_lines:
        head, sep, rest = text.partition("\n*Before*")
        text = head + "".join(f"- {line}\n" for line in extra_lines) + sep + rest
    (run_dir / "report.md").write_text(text, encoding="utf-8")
