"""Migration: a script in legacy TRL 0.11's documented style runs with only `trl` -> `rlhf_cli` changed,
and its stats are what the documented formulas (rlhf_cli.algo's docstrings) give."""

from __future__ import annotations

import re
import runpy
import warnings
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "trl_scripts" / "ppo_legacy_style.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script_run(tiny_gpt2_dir):
    patch = pytest.MonkeyPatch()
    patch.setenv("MODEL_NAME", str(tiny_gpt2_dir))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        patch.undo()


def test_the_script_differs_from_trl_only_in_the_import():
    source = SCRIPT.read_text()
    code = source.split('"""', 2)[2]  # the docstring may say what changed
    imports = re.findall(r"^\s*(?:from|import) (\S+)", code, flags=re.MULTILINE)
    assert {name for name in imports if name.startswith("rlhf_cli")} == {"rlhf_cli", "rlhf_cli.core"}
    assert "rlhf_cli" not in code.replace("from rlhf_cli", "")  # no other use of our name
    # With the import written as TRL's, nothing of ours is left: the script is TRL code.
    assert set(imports) - {"rlhf_cli", "rlhf_cli.core"} <= {"os", "torch", "transformers"}


def test_readme_example_stats(script_run):
    stats = script_run["readme_stats"]
    assert stats["ppo/mean_scores"] == pytest.approx(1.0)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # untrained policy = its frozen copy
    assert stats["objective/kl_coef"] == pytest.approx(0.2)
    assert stats["tokens/responses_len_mean"] == 20  # respond_to_batch's txt_len


def test_training_loop_stats_follow_the_documented_formulas(script_run):
    history, config = script_run["history"], script_run["config"]
    penalty = script_run["LENGTH_PENALTY"]
    assert len(history) == 2 * (10 // 4)  # 2 epochs of a 10-row dataset in batches of 4, last one dropped
    beta = 0.2
    for step, record in enumerate(history):
        stats, masks = record["stats"], record["masks"]
        log_ratio = (record["logprobs"] - record["ref_logprobs"]) * masks
        lengths = [len(r) for r in record["responses"]]
        # KL (mode "kl"): mean over samples of the summed per-token log-ratio, as batched_forward_pass saw it.
        assert stats["objective/kl"] == pytest.approx(float(log_ratio.sum(-1).mean()), abs=1e-5)
        assert stats["objective/entropy"] == pytest.approx(float((-record["logprobs"] * masks).sum(-1).mean()), abs=1e-4)
        # Non-score reward: -beta * KL per token, minus the subclass's length penalty, masked mean.
        expected_non_score = float(((-beta * log_ratio - penalty * masks).sum()) / masks.sum())
        assert stats["ppo/mean_non_score_reward"] == pytest.approx(expected_non_score, abs=1e-5)
        assert stats["objective/kl_coef"] == pytest.approx(beta, rel=1e-9)
        assert stats["ppo/mean_scores"] == pytest.approx(float(torch.stack(record["rewards"]).mean()))
        assert stats["tokens/responses_len_mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert masks.sum(-1).tolist() == lengths
        # The user's scheduler, prepared by Accelerate, steps once per step(): lr_k = lr_0 * 0.9^k.
        assert stats["ppo/learning_rate"] == pytest.approx(config.learning_rate * 0.9**step)
        # The reference answered every query, new tokens only, within LengthSampler(2, 6)'s budgets.
        assert len(record["ref_responses"]) == len(record["responses"])
        assert all(1 <= len(r) <= 5 and r.dim() == 1 for r in record["ref_responses"])
        # Adaptive controller: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).
        error = min(max(stats["objective/kl"] / config.target - 1, -0.2), 0.2)
        beta *= 1 + error * config.batch_size / config.horizon
    assert script_run["trainer"].kl_ctl.value == pytest.approx(beta, rel=1e-9)
    assert any(abs(record["stats"]["objective/kl"]) > 1e-4 for record in history[1:])  # the policy did move


def test_config_keeps_trl_bookkeeping_fields(script_run):
    shown = script_run["config"].to_dict()
    assert (shown["exp_name"], shown["query_dataset"], shown["reward_model"]) == ("migration", "local-reviews", "count-of-good")
    assert (shown["world_size"], shown["global_batch_size"], shown["backward_batch_size"]) == (1, 4, 2)
