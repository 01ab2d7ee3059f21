"""The `rlhf` command through real subprocesses: help, version, recipes, --cfg, run directories, ranks.

Runs that would train use a stand-in engine (a script that puts a fake `rlhf_cli.engine.train` in
sys.modules before calling the CLI), so they only check what the CLI hands over: the config and
the run directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from rlhf_cli.config import paths, schema
from rlhf_cli.engine import components
from rlhf_cli.engine.components import settings_and_launch
from rlhf_cli.ppo import settings as ppo_settings
from rlhf_cli.config.compose import compose_train_config

FAKE_ENGINE = '''
import json, os, sys, types
from pathlib import Path
from omegaconf import OmegaConf
from rlhf_cli.errors import RlhfError


class PretendDataError(RlhfError):
    exit_code = 3


def run_training(cfg, on_start=None):
    if on_start is not None and cfg.seed not in (13, 14):
        on_start(Path(cfg.output_dir))  # what the engine calls once the run has really started
    record = {
        "output_dir": cfg.output_dir,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "listing": sorted(os.listdir(cfg.output_dir)),
        "yaml": OmegaConf.to_yaml(cfg),
    }
    with open(os.environ["FAKE_ENGINE_LOG"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\\n")
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
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="250", **extra)
    return env


def rlhf(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=120)


def rlhf_with_fake_engine(*args: str, cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    script = cwd / "fake_engine_cli.py"
    script.write_text(FAKE_ENGINE, encoding="utf-8")
    log = cwd / "engine_calls.jsonl"
    done = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=cli_env(FAKE_ENGINE_LOG=str(log), **env),
                          capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_help_lists_subcommands_and_imports_neither_torch_nor_hydra(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "rlhf_cli", "--help"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert re.search(r"^\s+train\s+\S", done.stdout, re.MULTILINE)
    assert re.search(r"^\s+recipes\s+\S", done.stdout, re.MULTILINE)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "rlhf_cli.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "hydra")}


def test_no_arguments_prints_the_help(tmp_path: Path) -> None:
    done = rlhf(cwd=tmp_path)
    assert done.returncode == 0 and "commands:" in done.stdout and "train" in done.stdout


def test_version(tmp_path: Path) -> None:
    import rlhf_cli

    done = rlhf("--version", cwd=tmp_path)
    assert done.returncode == 0 and rlhf_cli.__version__ in done.stdout


def test_recipes_lists_every_recipe_with_its_description(tmp_path: Path) -> None:
    done = rlhf("recipes", cwd=tmp_path)
    assert done.returncode == 0
    for name, path in paths.recipe_files().items():
        first_line = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        assert re.search(rf"{name}\s+│\s+{re.escape(first_line)}", done.stdout), name
    assert {"imdb_sentiment", "smoke"} <= set(paths.recipe_files())


def test_cfg_job_prints_the_composed_config_and_creates_nothing(tmp_path: Path) -> None:
    done = rlhf("train", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = OmegaConf.to_container(OmegaConf.create(done.stdout))
    assert printed.pop("output_dir") == "${hydra:runtime.output_dir}"
    expected = OmegaConf.to_container(compose_train_config())
    expected.pop("output_dir")
    assert printed == expected
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_with_the_classic_recipe_shows_trl_values(tmp_path: Path) -> None:
    done = rlhf("train", "+recipe=imdb_sentiment", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = OmegaConf.create(done.stdout)
    assert (cfg.model.name_or_path, cfg.reward.model, cfg.dataset.path) == (
        "lvwerra/gpt2-imdb", "lvwerra/distilbert-imdb", "stanfordnlp/imdb")
    assert (cfg.ppo.learning_rate, cfg.ppo.batch_size, cfg.ppo.ppo_epochs, cfg.ppo.init_kl_coef) == (1.41e-5, 128, 4, 0.2)
    assert (cfg.generation.response_min_tokens, cfg.generation.response_max_tokens) == (4, 16)


def test_forward_batch_size_is_settable_from_the_command_line(tmp_path: Path) -> None:
    """forward_batch_size was missing from the schema and the YAML: with the engine's settings as the one
    source it is a ppo knob, shown by --cfg job and divided over the processes like every global size."""
    done = rlhf("train", "ppo.forward_batch_size=8", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert OmegaConf.create(done.stdout).ppo.forward_batch_size == 8
    default = OmegaConf.create(rlhf("train", "--cfg", "job", cwd=tmp_path).stdout)
    assert "forward_batch_size" in default.ppo and default.ppo.forward_batch_size is None
    cfg = compose_train_config(["ppo.forward_batch_size=8"])
    assert settings_and_launch(cfg, num_processes=2, tracker_dir=str(tmp_path))[0].forward_batch_size == 4
    assert settings_and_launch(compose_train_config(), num_processes=1, tracker_dir=str(tmp_path))[0].forward_batch_size is None


def test_a_knob_added_to_the_engine_settings_reaches_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a field to PPOSettings is all a new knob needs: the schema's ppo group gains it with its
    type, default and range, and a command-line override is type-checked."""
    @dataclasses.dataclass(frozen=True)
    class WithNewKnob(ppo_settings.PPOSettings):
        new_knob: int = ppo_settings.knob(7, ge=1)

    monkeypatch.setattr(ppo_settings, "PPOSettings", WithNewKnob)
    monkeypatch.setattr(schema, "PPOSettings", WithNewKnob)
    section = schema._ppo_section()
    assert section().new_knob == 7 and typing.get_type_hints(section)["new_knob"] is int
    assert dataclasses.fields(section)[-2].metadata == {"ge": 1}  # new_knob, before mixed_precision
    node = OmegaConf.merge(OmegaConf.structured(section), {"new_knob": 3})
    assert node.new_knob == 3
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(section), {"new_knob": "many"})


def test_output_dir_override_lands_in_the_resolved_config(tmp_path: Path) -> None:
    done = rlhf("train", "output_dir=runs/x", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert OmegaConf.create(done.stdout).output_dir == str(tmp_path / "runs" / "x")
    assert not (tmp_path / "runs").exists()


def test_multirun_cfg_job_prints_every_job(tmp_path: Path) -> None:
    done = rlhf("train", "-m", "seed=1,2", "steps=5", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    parts = re.split(r"^# job \d+: .*$", done.stdout, flags=re.MULTILINE)[1:]
    assert [OmegaConf.create(part).seed for part in parts] == [1, 2]
    assert all(OmegaConf.create(part).steps == 5 for part in parts)
    assert list(tmp_path.iterdir()) == []


def test_train_help_lists_groups_and_recipes(tmp_path: Path) -> None:
    done = rlhf("train", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model: gpt2, gpt2_imdb, local, review_gpt2, smollm2, t5_small, tiny_gpt2" in done.stdout
    assert "recipe: imdb_grpo, imdb_rlhf, imdb_rloo, imdb_sentiment, smoke, smollm2_imdb" in done.stdout
    # configs/accelerate/ holds `accelerate launch --config_file` files, not a config group.
    assert "accelerate:" not in done.stdout and "cpu_ddp" not in done.stdout


def test_train_runs_in_output_dir_with_hydra_files(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", "output_dir=runs/x", "seed=5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (call,) = calls
    assert call["output_dir"] == str(tmp_path / "runs" / "x")
    assert ".hydra" in call["listing"]
    saved = OmegaConf.load(tmp_path / "runs" / "x" / ".hydra" / "config.yaml")
    assert saved.seed == 5
    assert "${" not in call["yaml"], "the engine receives a resolved config"


def test_default_run_dir_is_outputs_date_time(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = Path(calls[0]["output_dir"])
    assert run_dir.parent.parent == tmp_path / "outputs"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name) and re.fullmatch(r"\d{2}-\d{2}-\d{2}", run_dir.name)


def test_multirun_gives_each_job_its_own_directory(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", "-m", "seed=1,2", "output_dir=sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [(call["seed"], call["output_dir"]) for call in calls] == [
        (1, str(tmp_path / "sweep" / "0")), (2, str(tmp_path / "sweep" / "1"))]
    assert all(".hydra" in call["listing"] for call in calls)


def test_rank_other_than_zero_writes_nothing_in_the_output_tree(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", "output_dir=runs/x", cwd=tmp_path, RANK="1", LOCAL_RANK="1")
    assert done.returncode == 0, done.stderr
    (call,) = calls
    assert not Path(call["output_dir"]).is_relative_to(tmp_path)
    assert call["listing"] == [], "no .hydra/ and no log file"
    assert not Path(call["output_dir"]).exists(), "the scratch run directory is removed afterwards"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine_calls.jsonl", "fake_engine_cli.py"]


def test_local_rank_is_the_fallback_for_rank(tmp_path: Path) -> None:
    done, calls = rlhf_with_fake_engine("train", "output_dir=runs/x", cwd=tmp_path, LOCAL_RANK="1")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "runs").exists()
