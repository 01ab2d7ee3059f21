"""Checkpoint helpers without a training run: config comparison, RNG capture/restore, discovery."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    compare_configs,
    list_checkpoints,
    read_checkpoint,
    resolve_resume,
    restore_rng,
)


def _cfg(**changes):
    base = {
        "seed": 0, "steps": 10, "output_dir": "/a", "logging": {"log_every": 1},
        "model": {"name_or_path": "gpt2", "tiny": {"n_embd": 64}},
        "ppo": {"batch_size": 8, "learning_rate": 1e-5, "ppo_epochs": 4},
        "checkpoint": {"every": 2, "resume": None},
    }
    cfg = OmegaConf.create(base)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_compare_configs_sorts_changes_by_consequence():
    changes = compare_configs(
        _cfg(),
        _cfg(**{"steps": 20, "logging.log_every": 5, "output_dir": "/b", "checkpoint.resume": "auto",
                "ppo.batch_size": 16, "model.tiny.n_embd": 32, "seed": 1,
                "ppo.learning_rate": 2e-5, "ppo.ppo_epochs": 2}),
    )
    assert changes.breaking == ["model.tiny.n_embd: 64 → 32", "ppo.batch_size: 8 → 16", "seed: 0 → 1"]
    assert {line.split(":")[0] for line in changes.harmless} == {"checkpoint.resume", "logging.log_every", "output_dir", "steps"}
    assert {line.split(":")[0] for line in changes.other} == {"ppo.learning_rate", "ppo.ppo_epochs"}
    assert compare_configs(_cfg(), _cfg()) == type(changes)([], [], [])


def test_rng_capture_and_restore_continue_every_stream():
    length_rng = np.random.default_rng(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng(length_rng)
    expected = (random.random(), np.random.rand(), torch.rand(2), length_rng.integers(0, 1000, 3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    length_rng.integers(0, 10, 50)
    import json

    restore_rng(json.loads(json.dumps(state)), length_rng)  # through JSON, as on disk
    got = (random.random(), np.random.rand(), torch.rand(2), length_rng.integers(0, 1000, 3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2]) and (got[3] == expected[3]).all()


def test_discovery_ignores_temporary_and_foreign_directories(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-2", "step-10", ".tmp-step-12", "step-x", "notes"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-10"]
    assert resolve_resume("auto", tmp_path).name == "step-10"
    assert resolve_resume("auto", tmp_path / "empty") is None
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(root / "step-2")
