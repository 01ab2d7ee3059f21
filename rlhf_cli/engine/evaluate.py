"""``rlhf eval RUN_DIR``: the before/after comparison of a finished run, on demand.

"Before" is the initial policy rebuilt from the run's config (the same weights the run started
from), "after" the run's ``final/``. Writes report.md and curves.png into the run directory, through the
same held-out path as the end of training (:mod:`rlhf_cli.engine.heldout`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from rlhf_cli.engine.heldout import compare_on_heldout, model_generation_settings, write_report
from rlhf_cli.engine.report import Comparison, plot_curves
from rlhf_cli.engine.run_lock import acquire
from rlhf_cli.errors import RlhfError


def _trained_policy(final_dir: Path, kind: str):
    from rlhf_cli.models import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, disable_dropout

    cls = AutoModelForSeq2SeqLMWithValueHead if kind == "seq2seq" else AutoModelForCausalLMWithValueHead
    policy = cls.from_pretrained(str(final_dir))
    disable_dropout(policy)
    return policy


def evaluate_run(run_dir: Path, *, prompts: int | None = None) -> Comparison:
    """Compare the run's initial and final policy on held-out prompts; write report.md and curves.png
    (holding the run directory's lock, see :mod:`rlhf_cli.engine.run_lock`)."""
    run_dir = Path(run_dir).expanduser().resolve()
    config_path, final_dir = run_dir / "config.yaml", run_dir / "final"
    if not config_path.is_file():
        raise RlhfError(f"{run_dir} is not a run directory: it has no config.yaml. Give the output_dir of an `rlhf train` run.")
    if not (final_dir / "config.json").is_file():
        raise RlhfError(
            f"{run_dir} has no final/ model: the run has not finished. Continue it with `rlhf train ... "
            f"checkpoint.resume=auto output_dir={run_dir}`, or export a checkpoint with `rlhf export`."
        )
    lock = acquire(run_dir, command="rlhf eval")  # it writes report.md and curves.png: not beside a running run
    try:
        return _evaluate(run_dir, OmegaConf.load(config_path), prompts)
    finally:
        lock.release()


def _evaluate(run_dir: Path, cfg, prompts: int | None) -> Comparison:
    import json

    from rlhf_cli.data.prompts import build_prompt_data
    from rlhf_cli.models import load_policy_and_tokenizer
    from rlhf_cli.rewards import build_reward
    from rlhf_cli.seeding import set_seed

    final_dir, metrics_path = run_dir / "final", run_dir / "metrics.jsonl"
    set_seed(int(cfg.seed))
    before, tokenizer = load_policy_and_tokenizer(cfg.model, disable_dropout=True)
    after = _trained_policy(final_dir, str(cfg.model.kind))
    data = build_prompt_data(cfg.dataset, tokenizer, seed=int(cfg.seed))
    rows = min(int(prompts if prompts is not None else cfg.eval_prompts), len(data.heldout))
    if rows < 1:
        raise RlhfError(f"No held-out prompts to evaluate on (dataset.eval_size={cfg.dataset.eval_size}, eval_prompts={cfg.eval_prompts}).")
    comparison = compare_on_heldout(
        cfg,
        data.heldout,
        rows,
        before_model=before,
        after_model=after,
        tokenizer=tokenizer,
        reward_fn=build_reward(cfg.reward),
        generation=model_generation_settings(cfg, tokenizer, before),
        device="cpu",
    )
    reward_means = []
    if metrics_path.is_file():
        reward_means = [json.loads(line)["env/reward_mean"] for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        plot_curves(metrics_path, run_dir / "curves.png")
    write_report(run_dir, comparison, reward_means)
    return comparison
