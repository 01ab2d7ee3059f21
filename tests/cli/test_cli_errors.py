"""User mistakes on the `rlhf` command line: one paragraph, the closest match, no traceback, exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cli.config import paths

# Stands in for the training engine: it records each call and fails the way the seed says.
FAILING_ENGINE = '''
import os, sys, types
from rlhf_cli.errors import RlhfError


class PretendDataError(RlhfError):
    exit_code = 3


def run_training(cfg, on_start=None):
    with open(os.environ["FAKE_ENGINE_LOG"], "a", encoding="utf-8") as handle:
        handle.write(f"{cfg.seed}\\n")
    if cfg.seed == 13:
        raise PretendDataError("The prompts file is empty: point dataset.data_files at a file with texts.")
    if cfg.seed == 14:
        raise RuntimeError("a bug in the engine")


module = types.ModuleType("rlhf_cli.engine.train")
module.run_training = run_training
sys.modules["rlhf_cli.engine.train"] = module
from rlhf_cli.cli import main

sys.exit(main(sys.argv[1:]))
'''


def cli_env(**extra: str) -> dict[str, str]:
    """No HYDRA_FULL_ERROR: our messages must not depend on it."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="100", **extra)
    return env


def rlhf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def rlhf_with_fake_engine(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    script = cwd / "failing_engine_cli.py"
    script.write_text(FAILING_ENGINE, encoding="utf-8")
    log = cwd / "engine_calls.txt"
    done = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=cli_env(FAKE_ENGINE_LOG=str(log)),
                          capture_output=True, text=True, timeout=120)
    return done, [int(line) for line in log.read_text().split()] if log.exists() else []


def assert_one_paragraph_error(stderr: str, stdout: str = "") -> str:
    assert "Traceback" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["ppo.learnin_rate=1"],
         ["Unknown config key 'ppo.learnin_rate'", "command-line override 'ppo.learnin_rate=1'",
          "Did you mean 'ppo.learning_rate'?", "Valid keys of 'ppo': learning_rate, batch_size, mini_batch_size"]),
        (["stpes=3"], ["Unknown config key 'stpes'", "Did you mean 'steps'?"]),
        (["ppo.batch_size=abc"], ["Wrong type for 'ppo.batch_size'", "expected an integer, got 'abc'"]),
        (["model=gpt3"],
         ["Unknown model option 'gpt3'", "Available model options: gpt2, gpt2_imdb, local, review_gpt2, smollm2, t5_small, tiny_gpt2",
          "Did you mean 'gpt2'?"]),
        (["+recipe=nope"], ["Unknown recipe 'nope'", "Available recipes: imdb_grpo, imdb_rlhf, imdb_rloo, imdb_sentiment, rm_smoke, smoke, smollm2_imdb", "rlhf recipes"]),
        (["+recipe=imdb_sentimnt"], ["Did you mean 'imdb_sentiment'?"]),
        (["model.kind=seqseq"],
         ["Invalid value 'seqseq' for 'model.kind'", "Valid values: causal, seq2seq", "Did you mean 'seq2seq'?"]),
        (["reward.output=logits"], ["Valid values: logit, probability", "Did you mean 'logit'?"]),
        (["model=local"], ["'model.name_or_path' is empty", "model.name_or_path=<"]),
        (["a=b=c"], ["Cannot parse the command-line override 'a=b=c'"]),
        (["seed=1,2"], ["Ambiguous value for argument 'seed=1,2'", "--multirun"]),
        (["-m", "seed=1,2", "ppo.kl_penalty=kll"], ["In sweep job 0", "Did you mean 'kl'?"]),
        (["-m", "output_dir=a,b"], ["sweeps the output directory"]),
        (["+recipe=smoke", "--cfg", "job", "ppo.learnin_rate=1"], ["Did you mean 'ppo.learning_rate'?"]),
        (["model=gpt3", "--help"], ["Unknown model option 'gpt3'"]),
    ],
)
def test_config_mistakes_print_one_paragraph_and_exit_2(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    done = rlhf("train", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = assert_one_paragraph_error(done.stderr, done.stdout)
    for fragment in fragments:
        assert fragment in message
    assert list(tmp_path.iterdir()) == [], "nothing is created for a rejected command"


def test_misspelt_key_in_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    extra = tmp_path / "my_configs"
    (extra / "model").mkdir(parents=True)
    (extra / "model" / "mine.yaml").write_text("# my model\nsorce: tiny_gpt2\n", encoding="utf-8")
    done = rlhf("train", "--config-dir", str(extra), "model=mine", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = assert_one_paragraph_error(done.stderr, done.stdout)
    assert "Unknown config key 'model.sorce'" in message and "model/mine" in message
    assert "Did you mean 'model.source'?" in message


def test_misspelt_key_in_a_packaged_group_file_names_its_path(tmp_path: Path) -> None:
    """A copy of the packaged configs with a typo in ppo/default.yaml, used as --config-path."""
    configs = tmp_path / "configs"
    shutil.copytree(paths.config_dir(), configs)
    default = configs / "ppo" / "default.yaml"
    # The packaged file sets no value (the defaults are PPOConfig's): the typo is a key a user adds.
    default.write_text(default.read_text(encoding="utf-8").replace("{}", "clip_range_value: 0.2"))
    done = rlhf("train", "--config-path", str(configs), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = assert_one_paragraph_error(done.stderr, done.stdout)
    assert "Unknown config key 'ppo.clip_range_value'" in message
    assert "Did you mean 'ppo.cliprange_value'?" in message


def test_unknown_subcommand_suggests_the_closest(tmp_path: Path) -> None:
    done = rlhf("trian", cwd=tmp_path)
    assert done.returncode == 2
    message = assert_one_paragraph_error(done.stderr)
    assert "Unknown command 'trian'. Did you mean 'train'?" in message


def test_user_error_from_the_engine_is_one_paragraph_with_its_exit_code(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", "seed=13", cwd=tmp_path)
    assert len(calls) == 1
    assert done.returncode == 3
    message = assert_one_paragraph_error(done.stderr, done.stdout)
    assert message == "Error: The prompts file is empty: point dataset.data_files at a file with texts."


def test_user_error_in_one_sweep_job_lets_the_others_run(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", "-m", "seed=13,2", cwd=tmp_path)
    assert calls == [13, 2]
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert "Error: Job 0 (seed=13): The prompts file is empty" in done.stderr


def test_bug_in_the_engine_keeps_its_traceback(tmp_path: Path) -> None:
    done, _ = rlhf_with_fake_engine("train", "seed=14", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug in the engine" in done.stderr


def test_recipes_takes_no_arguments(tmp_path: Path) -> None:
    done = rlhf("recipes", "smoke", cwd=tmp_path)
    assert done.returncode == 2
    assert "takes no arguments" in assert_one_paragraph_error(done.stderr)
