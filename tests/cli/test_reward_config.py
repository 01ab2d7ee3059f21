"""`rlhf reward`'s config (issue 19): its groups and recipes compose, keys are typo-proof, and the
YAML values equal the schema's where the offline default does not set them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_cli.config import paths
from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.config.reward_schema import PreferenceDataConfig
from rlhf_cli.errors import ConfigError


def _compose(*overrides: str):
    return compose_train_config(list(overrides), config_name="reward")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_offline_default_composes():
    cfg = _compose()
    assert (cfg.model.source, cfg.data.source) == ("review_gpt2", "imdb_pairs")
    assert [b.type for b in cfg.eval.baselines] == ["vader"]


@pytest.mark.parametrize("option", sorted(p.stem for p in (paths.config_dir() / "data").glob("*.yaml")))
def test_every_data_option_equals_the_schema_defaults_it_does_not_change(option):
    cfg = _compose(f"data={option}", "data.data_files=[/tmp/pairs.jsonl]", "data.path=some/id")
    schema = OmegaConf.structured(PreferenceDataConfig)
    own = OmegaConf.load(paths.config_dir() / "data" / f"{option}.yaml")
    for key in schema:
        if key in ("data_files", "path"):
            continue
        assert cfg.data[key] == own[key], key  # the file's value is what composes
    assert set(own) == set(schema), "every data key is written in the option file"


@pytest.mark.parametrize("recipe", sorted(paths.reward_recipe_files()))
def test_reward_recipes_compose_and_describe_themselves(recipe):
    _compose(f"+recipe={recipe}")
    first = paths.reward_recipe_files()[recipe].read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# rlhf reward:")


def test_a_misspelt_key_fails_with_a_suggestion():
    with pytest.raises(ConfigError, match="optim.learnig_rate"):
        _compose("optim.learnig_rate=1e-3")
    with pytest.raises(ConfigError, match="Invalid value 'third' for 'data.ties'. Valid values: skip, half"):
        _compose("data.ties=third")


def test_cfg_job_prints_the_reward_config():
    done = subprocess.run([sys.executable, "-m", "rlhf_cli", "reward", "+recipe=rm_smoke", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg = OmegaConf.create(done.stdout)
    assert cfg.model.source == "tiny_gpt2" and cfg.optim.batch_size == 8 and "ppo" not in cfg


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("stpes=3", ["Unknown config key 'stpes'", "Valid keys of the top level: model, data, optim,", "rlhf reward --cfg job"]),
        ("data.nme=x", ["Did you mean 'data.name'?", "Valid keys of 'data': source,", "rlhf reward --cfg job"]),
        ("data.data_files=${nope}", ["Cannot resolve the interpolation of 'data.data_files'", "rlhf reward --cfg job"]),
        ("optim.batch_size=abc", ["Wrong type for 'optim.batch_size'", "expected an integer, got 'abc'", "optim.batch_size=<integer>"]),
    ],
)
def test_mistakes_are_explained_in_rlhf_reward_s_keys_and_command(override, fragments):
    """Issue 21: the messages named `rlhf train --cfg job` and train's keys for a reward config."""
    with pytest.raises(ConfigError) as refusal:
        _compose(override)
    message = str(refusal.value)
    assert all(fragment in message for fragment in fragments), message
    assert "rlhf train" not in message and "ppo" not in message


def test_the_command_line_names_rlhf_reward_in_a_sweep_job_s_mistake(tmp_path):
    from tests.cli.test_cli_errors import assert_one_paragraph_error, cli_env

    done = subprocess.run([sys.executable, "-m", "rlhf_cli", "reward", "-m", "seed=1,2", "optim.learnig_rate=1"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    message = assert_one_paragraph_error(done.stderr, done.stdout)
    assert "Did you mean 'optim.learning_rate'?" in message and "run `rlhf reward --cfg job`" in message
    assert list(tmp_path.iterdir()) == []
