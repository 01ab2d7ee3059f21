"""A non-editable install works from any directory (issue 3, item 8).

The wheel is built from this checkout offline (hatchling from the test environment, no build isolation)
and installed into a fresh virtual environment that sees the test environment's packages (torch,
transformers, ...) through a plain path entry. That entry is not a site directory, so its .pth files
are not read, and the editable install of rlhf_cli (a .pth pointing at the checkout) stays out of sight:
the commands below can only find rlhf_cli, its configs and its recipes inside the installed wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("rlhf_cli-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A virtual environment with the wheel installed; returns its root."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    test_env_dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site_dir, "test_env_packages.pth").write_text("\n".join(test_env_dirs) + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200")
    return env


def run_in(venv: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / command[0]), *command[1:]], cwd=cwd, env=venv_env(),
                          capture_output=True, text=True, timeout=300)


def test_wheel_carries_every_config_and_recipe(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {"rlhf_cli/_configs/train.yaml", "rlhf_cli/_recipes/smoke.yaml", "rlhf_cli/__main__.py"} <= names
    packaged = {n for n in names if n.startswith(("rlhf_cli/_configs/", "rlhf_cli/_recipes/"))}
    in_checkout = {f"rlhf_cli/_configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    in_checkout |= {f"rlhf_cli/_recipes/{p.relative_to(REPO / 'recipes')}" for p in (REPO / "recipes").rglob("*.yaml")}
    assert packaged == in_checkout
    assert "rlhf = rlhf_cli.cli:main" in entry_points


def test_installed_package_is_the_one_imported(venv: Path, tmp_path: Path) -> None:
    probe = ("import json, sys, rlhf_cli; from rlhf_cli.config import paths; "
             "print(json.dumps({'module': rlhf_cli.__file__, 'configs': str(paths.config_dir()), "
             "'recipes': {k: str(v) for k, v in paths.recipe_files().items()}, 'sys_path': sys.path}))")
    done = run_in(venv, "python", "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    package = Path(found["module"]).parent
    assert package.is_relative_to(venv) and package.name == "rlhf_cli"
    assert found["configs"] == str(package / "_configs")
    assert found["recipes"]["smoke"] == str(package / "_recipes" / "smoke.yaml")
    # The checkout's package must not be importable from the installed environment (a venv may live
    # inside the checkout, as .ci/run's does, so compare where `rlhf_cli` would come from).
    source = (REPO / "rlhf_cli").resolve()
    assert not [entry for entry in found["sys_path"] if entry and (Path(entry) / "rlhf_cli").resolve() == source]


def test_installed_rlhf_recipes_runs_from_another_directory(venv: Path, tmp_path: Path) -> None:
    done = run_in(venv, "rlhf", "recipes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "imdb_sentiment" in done.stdout and "smoke" in done.stdout


@pytest.mark.slow
def test_installed_smoke_run_from_another_directory(venv: Path, tmp_path: Path) -> None:
    done = run_in(venv, "python", "-m", "rlhf_cli", "train", "+recipe=smoke", "output_dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    assert len((run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    assert (run_dir / "final" / "config.json").is_file()
    assert OmegaConf.load(run_dir / "config.yaml").steps == 3
    hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
    (primary,) = [source.path for source in hydra.runtime.config_sources if source.provider == "main"]
    assert Path(primary).is_relative_to(venv) and Path(primary).name == "_configs"
    assert hydra.runtime.choices.recipe == "smoke"


def test_installed_review_lm_loads_from_another_directory(wheel: Path, venv: Path, tmp_path: Path) -> None:
    """The shipped review GPT-2 (the default model) is inside the wheel and loads from the installed package."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"rlhf_cli/assets/review_gpt2/{name}" for name in ("model.safetensors", "config.json", "tokenizer.json")} <= names
    probe = ("import json; from rlhf_cli.assets import review_gpt2_dir; from rlhf_cli.config.schema import ModelConfig; "
             "from rlhf_cli.models import load_policy_and_tokenizer; "
             "policy, tok = load_policy_and_tokenizer(ModelConfig(source='review_gpt2')); "
             "print(json.dumps({'dir': str(review_gpt2_dir()), 'layers': policy.config.n_layer, 'vocab': len(tok), "
             "'text': tok.decode(tok('The movie was great.<br />')['input_ids'])}))")
    done = run_in(venv, "python", "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["dir"]).is_relative_to(venv)
    assert (found["layers"], found["vocab"], found["text"]) == (4, 8000, " the movie was great.")
