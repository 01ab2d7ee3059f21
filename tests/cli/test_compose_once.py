"""`rlhf train` composes and validates each job's config once (issue 21): the command line's check
and Hydra's run (or sweep) share one composition, counted here in-process with spies."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl

from rlhf_cli import cli_train
from rlhf_cli.cli import main
from rlhf_cli.config import compose


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Counter, list]:
    """Counts of Hydra compositions and of our validations; the jobs run (a stand-in records the seed)."""
    counts: Counter = Counter()
    ran: list = []
    load, validate = ConfigLoaderImpl.load_configuration, compose.validate_config

    def counting_load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts["compose"] += 1
        return load(self, *args, **kwargs)

    def counting_validate(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts["validate"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counting_load)
    monkeypatch.setattr(compose, "validate_config", counting_validate)
    monkeypatch.setitem(cli_train.RUNNERS, "train", lambda cfg, on_start: ran.append((cfg.seed, cfg.output_dir)))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra's job logging replaces them
    yield counts, ran
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_run_composes_and_validates_once(counted: tuple[Counter, list], tmp_path: Path) -> None:
    counts, ran = counted
    assert main(["train", "+recipe=smoke", "seed=5", "output_dir=run"]) == 0
    assert ran == [(5, str(tmp_path / "run"))]
    assert counts == {"compose": 1, "validate": 1}


def test_a_sweep_composes_and_validates_each_job_once(counted: tuple[Counter, list], tmp_path: Path) -> None:
    counts, ran = counted
    assert main(["train", "-m", "+recipe=smoke", "seed=1,2,3", "output_dir=sweep"]) == 0
    assert ran == [(seed, str(tmp_path / "sweep" / str(job))) for job, seed in enumerate((1, 2, 3))]
    # One per job, and the sweep's own config (Hydra's multirun.yaml, the jobs' ${now:...} cache).
    assert counts == {"compose": 3 + 1, "validate": 3}
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--help"]])
def test_printing_the_config_composes_once(flag: list[str], counted: tuple[Counter, list]) -> None:
    counts, ran = counted
    assert main(["train", "+recipe=smoke", *flag]) == 0
    assert ran == [] and counts == {"compose": 1, "validate": 1}


def test_a_rejected_override_composes_once_and_runs_nothing(counted: tuple[Counter, list], tmp_path: Path) -> None:
    counts, ran = counted
    assert main(["train", "+recipe=smoke", "ppo.kl_penalty=kll", "output_dir=run"]) == 2
    assert ran == [] and counts == {"compose": 1, "validate": 1}
    assert list(tmp_path.iterdir()) == []
