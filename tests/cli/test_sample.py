"""`rlhf sample` on a finished `+recipe=smoke` run: which weights it samples, with what, and its errors.

One smoke run (3 steps, a checkpoint after step 2) is shared by the tests of this module. The in-process
tests check the properties (the model each target loads, the run's reward and prompts, the seed); the
subprocess tests check the command line (table, summary line, exit codes, messages).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.engine.sample import Samples, load_target, resolve_target, sample_run
from rlhf_cli.errors import RlhfError
from tests.cli.test_train_runs import assert_one_paragraph_error, cli_env, rlhf_train


def rlhf_sample(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", "sample", *args], cwd=cwd, env=cli_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke run with checkpoints/step-2 kept."""
    cwd = tmp_path_factory.mktemp("sample-cwd")
    done = rlhf_train("+recipe=smoke", "output_dir=run", "checkpoint.every=2", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "run"


def _logits(policy, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return policy.pretrained_model(ids).logits


@pytest.mark.slow
def test_each_target_loads_its_own_weights(run_dir: Path, one_thread) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 4, 5, 6, 7]])
    final, _ = load_target(resolve_target(run_dir))
    assert resolve_target(run_dir / "final").final_dir == run_dir / "final"
    torch.testing.assert_close(_logits(final, ids), AutoModelForCausalLM.from_pretrained(run_dir / "final")(ids).logits)
    step2 = run_dir / "checkpoints" / "step-2"
    checkpoint, _ = load_target(resolve_target(step2))
    saved = load_file(str(step2 / "weights.safetensors"))
    state = checkpoint.state_dict()
    for name, tensor in saved.items():  # tied weights are stored once
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    reference, _ = load_target(resolve_target(run_dir, reference=True))
    from rlhf_cli.models import load_policy_and_tokenizer

    initial, _ = load_policy_and_tokenizer(OmegaConf.load(run_dir / "config.yaml").model)
    torch.testing.assert_close(_logits(reference, ids), _logits(initial, ids), rtol=0, atol=0)
    # Three different models: after 3 steps, after 2 steps, before training.
    outputs = [_logits(m, ids) for m in (final, checkpoint, reference)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(outputs[i], outputs[j]), (i, j)
    # --reference with a checkpoint: the starting model of that checkpoint's run.
    again, _ = load_target(resolve_target(step2, reference=True))
    torch.testing.assert_close(_logits(again, ids), outputs[2], rtol=0, atol=0)


@pytest.mark.slow
def test_samples_use_the_runs_prompts_reward_and_seed(run_dir: Path, one_thread) -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from rlhf_cli.data.prompts import build_prompt_data

    cfg = OmegaConf.load(run_dir / "config.yaml")
    samples = sample_run(run_dir, samples_per_prompt=3)
    # Every held-out prompt of the run, each 3 times in a row.
    _, tokenizer = load_target(resolve_target(run_dir))
    heldout = list(build_prompt_data(cfg.dataset, tokenizer, seed=int(cfg.seed)).heldout["query"])
    assert samples.prompts == [q for q in heldout for _ in range(3)] and samples.num_prompts == len(heldout) == cfg.dataset.eval_size
    # The run's reward (VADER on the response): recomputed from the printed text.
    vader = SentimentIntensityAnalyzer()
    assert samples.rewards == pytest.approx([vader.polarity_scores(r)["compound"] for r in samples.responses], abs=1e-6)
    # The run's generation length, and a new budget when asked.
    assert len(samples.response_tokens) == len(samples.responses)
    assert max(samples.response_tokens) <= cfg.generation.response_max_tokens
    short = sample_run(run_dir, ["this movie"], samples_per_prompt=4, max_new_tokens=1)
    assert short.prompts == ["this movie"] * 4
    assert short.response_tokens and all(n <= 1 for n in short.response_tokens)
    # The seed (default: the run's) fixes the samples; the n samples of a prompt differ among themselves.
    assert sample_run(run_dir, samples_per_prompt=3).responses == samples.responses
    assert sample_run(run_dir, samples_per_prompt=3, seed=int(cfg.seed)).responses == samples.responses
    assert sample_run(run_dir, samples_per_prompt=3, seed=int(cfg.seed) + 1).responses != samples.responses
    assert len(set(samples.responses[:3])) > 1


def test_summary_is_the_mean_and_its_standard_error() -> None:
    samples = Samples("final", ["a", "a", "b", "b"], ["w", "x", "y", "z"], [0.5, -0.5, 1.0, 0.0], samples_per_prompt=2)
    # mean 0.25; sample variance ((.25² + .75² + .75² + .25²) / 3) = 5/12; SE = sqrt(5/12 / 4).
    assert samples.mean == pytest.approx(0.25)
    assert samples.standard_error == pytest.approx(math.sqrt(5 / 48))
    assert samples.summary() == "final: mean reward +0.250 ± 0.323 (standard error) over 4 samples (2 prompts × 2)"
    assert Samples("final", ["a"], ["w"], [0.3], 1).standard_error == 0.0


@pytest.mark.slow
def test_cli_prints_the_table_and_the_summary(run_dir: Path) -> None:
    args = (str(run_dir), "this movie", "the plot was", "--n", "2", "--seed", "3", "--max-new-tokens", "3")
    done = rlhf_sample(*args, cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    assert "rlhf sample: final" in done.stdout
    assert "this movie" in done.stdout and "the plot was" in done.stdout
    assert "over 4 samples (2 prompts × 2)" in done.stdout
    table_rewards = [float(cell) for cell in _reward_cells(done.stdout)]
    assert len(table_rewards) == 4
    mean = sum(table_rewards) / 4
    assert f"mean reward {mean:+.3f}" in done.stdout  # the summary is over the rows shown
    reference = rlhf_sample(str(run_dir / "checkpoints" / "step-2"), "--reference", "--prompts", "2", cwd=run_dir.parent)
    assert reference.returncode == 0, reference.stderr
    assert "rlhf sample: reference (starting model)" in reference.stdout and "(2 prompts × 1)" in reference.stdout
    checkpoint = rlhf_sample(str(run_dir / "checkpoints" / "step-2"), "--prompts", "1", cwd=run_dir.parent)
    assert checkpoint.returncode == 0 and "rlhf sample: checkpoint step-2" in checkpoint.stdout


def _reward_cells(stdout: str) -> list[str]:
    """The last cell of each table row that holds a signed reward."""
    cells = []
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) >= 4 and parts[-2][:1] in "+-" and parts[-2][1:2].isdigit():
            cells.append(parts[-2])
    return cells


@pytest.mark.slow
def test_cli_errors_for_missing_and_unknown_directories(run_dir: Path, tmp_path: Path) -> None:
    missing = assert_one_paragraph_error(rlhf_sample(str(tmp_path / "nope"), cwd=tmp_path))
    assert "does not exist" in missing and "nope" in missing
    (tmp_path / "other").mkdir()
    unknown = assert_one_paragraph_error(rlhf_sample(str(tmp_path / "other"), cwd=tmp_path))
    assert "is not a run directory" in unknown and "config.yaml" in unknown
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished / "config.yaml")
    message = assert_one_paragraph_error(rlhf_sample(str(unfinished), cwd=tmp_path))
    assert "has no final/ model" in message and "--reference" in message
    bad_n = assert_one_paragraph_error(rlhf_sample(str(run_dir), "--n", "0", cwd=tmp_path))
    assert "--n must be at least 1" in bad_n


def test_resolve_target_errors_in_process(tmp_path: Path) -> None:
    with pytest.raises(RlhfError, match="does not exist"):
        resolve_target(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RlhfError, match="is a file"):
        resolve_target(tmp_path / "file.txt")


def test_help_lists_sample_and_sample_help_imports_no_torch(tmp_path: Path) -> None:
    code = "import sys; from rlhf_cli.cli import main; main(['--help']); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+sample\s+generate from", done.stdout, re.MULTILINE), done.stdout
    assert done.stdout.strip().endswith("False"), "rlhf --help imported torch"
    usage = subprocess.run([sys.executable, "-m", "rlhf_cli", "sample", "--help"], cwd=tmp_path, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "RUN_DIR_OR_CHECKPOINT" in usage.stdout
    for option in ("--reference", "--n", "--seed", "--max-new-tokens"):
        assert option in usage.stdout
