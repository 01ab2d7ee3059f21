"""Faults a long run meets after it started (issue 25), for `rlhf reward` and the pieces both commands
share: the run-directory lock, a full disk at a checkpoint and at ``final/`` (with and without a stop
signal), and the divergence rule (a single non-finite step skipped, three in a row stop the run).

The reward runs are in-process on the rm_smoke recipe (a one-layer model, milliseconds a step); the
fault is injected where the write or the loss happens.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch

from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.engine import reward_train
from rlhf_cli.engine.disk import WriteError
from rlhf_cli.engine.divergence import STEPS_IN_A_ROW, DivergenceError, DivergenceWatch
from rlhf_cli.engine.run_lock import LOCK_NAME, RunLockedError, acquire
from rlhf_cli.engine.signals import Preempted
from rlhf_cli.reporting import NONFINITE_FIELD

STEPS = ["optim.steps=4", "checkpoint.every=1"]


def _cfg(out: Path, *extra: str):
    return compose_train_config(["+recipe=rm_smoke", f"output_dir={out}", *STEPS, *extra], config_name="reward")


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def _checkpoint_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{step}" / "weights.safetensors")


def _enospc(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture(scope="module")
def solo(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run, to compare a faulted-then-resumed run with."""
    out = tmp_path_factory.mktemp("solo") / "run"
    torch.set_num_threads(1)
    reward_train.run_reward_training(_cfg(out))
    return out


# The lock ------------------------------------------------------------------------------------------
def test_rlhf_reward_on_a_held_directory_is_refused_and_touches_nothing(tmp_path, one_thread):
    out = tmp_path / "run"
    holder = acquire(out)  # a running `rlhf train` (or another `rlhf reward`) holds it
    try:
        with pytest.raises(RunLockedError) as refused:
            reward_train.RewardTrainingRun(_cfg(out))
        assert f"PID {os.getpid()}" in str(refused.value) and "`rlhf reward` would write there" in str(refused.value)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "nothing written beside the holder's lock"
    finally:
        holder.release()


def test_a_reward_run_holds_the_lock_while_it_runs_and_leaves_none(tmp_path, one_thread):
    out = tmp_path / "run"
    run = reward_train.RewardTrainingRun(_cfg(out))
    try:
        with pytest.raises(RunLockedError, match="rlhf reward"):
            acquire(out, command="rlhf eval")
    finally:
        run.lock.release()
    assert not (out / LOCK_NAME).exists()
    reward_train.run_reward_training(_cfg(out, "overwrite=true"))  # free again
    assert not (out / LOCK_NAME).exists() and (out / "final").is_dir()


# A full disk ---------------------------------------------------------------------------------------
def _full_at(step: int, write):
    def full(tmp_dir: Path, **kwargs):
        if kwargs["loop"].step >= step:
            (tmp_dir / "weights.safetensors").write_bytes(b"\0" * 4096)  # half out when the disk filled
            raise _enospc(tmp_dir / "trainer.pt")
        return write(tmp_dir, **kwargs)

    return full


def test_a_full_disk_at_a_reward_checkpoint_is_a_message_and_resume_is_exact(tmp_path, monkeypatch, one_thread, solo):
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "write_main_files", _full_at(3, ckpt.write_main_files))
    with pytest.raises(WriteError) as full:
        reward_train.run_reward_training(_cfg(out))
    message = " ".join(str(full.value).split())
    for fragment in ("Could not write checkpoint step-3", "trainer.pt", "No space left on device", "needs about",
                     f"newest: {out / 'checkpoints' / 'step-2'}", "checkpoint.resume=auto"):
        assert fragment in message, message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"], "no .tmp-step-3 left"
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()
    monkeypatch.undo()  # space freed
    reward_train.run_reward_training(_cfg(out, "checkpoint.resume=auto"))
    assert _metrics(out) == _metrics(solo)  # bit for bit: step 3 is redone from step-2's checkpoint
    assert (out / "final" / "model.safetensors").read_bytes() == (solo / "final" / "model.safetensors").read_bytes()


def test_a_stop_signal_whose_checkpoint_fails_is_the_write_error_not_a_preemption(tmp_path, monkeypatch, one_thread):
    """SIGTERM then a full disk: the checkpoint was not written, so the run may not exit 75 (which
    promises a checkpoint to continue from) but 2 with the disk's message."""
    out = tmp_path / "run"
    real = ckpt.write_main_files
    monkeypatch.setattr(reward_train.RewardTrainingRun, "stop_requested", lambda self, request: self.loop.step == 2)
    monkeypatch.setattr(ckpt, "write_main_files", _full_at(2, real))
    with pytest.raises(WriteError, match="Could not write checkpoint step-2"):
        reward_train.run_reward_training(_cfg(out, "checkpoint.every=0"))
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    monkeypatch.setattr(ckpt, "write_main_files", real)
    with pytest.raises(Preempted, match=r"wrote the checkpoint .*step-2"):  # with the space: exit 75's error
        reward_train.run_reward_training(_cfg(tmp_path / "other", "checkpoint.every=0"))


def _full_final(model, tokenizer, directory) -> None:
    """save_final meeting a full disk half-way through the weights."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1024)
    raise _enospc(Path(directory) / "model.safetensors")


def test_a_full_disk_at_final_removes_the_half_written_model(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    monkeypatch.setattr(reward_train, "save_final", _full_final)
    with pytest.raises(WriteError) as error:
        reward_train.run_reward_training(_cfg(out))
    assert "Could not write final/" in str(error.value) and "model.safetensors" in str(error.value)
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-4", "the checkpoints are intact"


def test_a_full_disk_at_final_of_rlhf_train_is_a_message_and_keeps_the_checkpoints(tmp_path, monkeypatch, one_thread):
    from rlhf_cli.engine import saving, train

    out = tmp_path / "run"
    monkeypatch.setattr(saving, "save_final", _full_final)
    cfg = compose_train_config(["+recipe=smoke", f"output_dir={out}", "steps=2", "checkpoint.every=1", "eval_prompts=0"])
    with pytest.raises(WriteError) as error:
        train.run_training(cfg)
    message = " ".join(str(error.value).split())
    assert "Could not write final/" in message and f"newest: {out / 'checkpoints' / 'step-2'}" in message, message
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# Divergence ----------------------------------------------------------------------------------------
def _nan_loss_at(steps: set[int] | None, monkeypatch) -> None:
    """The Bradley–Terry loss made NaN at the given (1-based) steps, or at every step (None)."""
    from rlhf_cli.reward_model import trainer as trainer_module

    real, calls = trainer_module.bradley_terry_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * math.nan if steps is None or len(calls) in steps else value

    monkeypatch.setattr(trainer_module, "bradley_terry_loss", loss)


def test_a_single_nonfinite_reward_step_is_skipped_and_the_line_says_so(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    _nan_loss_at({2}, monkeypatch)
    reward_train.run_reward_training(_cfg(out, "checkpoint.keep=4"))
    rows = _metrics(out)
    assert [row["train/skipped_update"] for row in rows] == [0.0, 1.0, 0.0, 0.0]
    assert rows[1]["train/nonfinite_loss"] == 1.0 and [row["train/nonfinite_loss"] for row in rows].count(1.0) == 1
    for row in rows:  # a null always comes with the field that names it
        assert sorted(k for k, v in row.items() if v is None) == sorted(row.get(NONFINITE_FIELD, []))
    step1, step2 = _checkpoint_weights(out, 1), _checkpoint_weights(out, 2)
    assert all(torch.equal(step1[key], step2[key]) for key in step1), "the skipped step left the weights as they were"
    assert (out / "final").is_dir()


def test_a_diverging_reward_run_stops_with_one_paragraph_and_writes_no_nan(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    _nan_loss_at(None, monkeypatch)
    with pytest.raises(DivergenceError) as diverged:
        reward_train.run_reward_training(_cfg(out, "optim.steps=8"))
    message = " ".join(str(diverged.value).split())
    assert f"Reward-model training diverged at step {STEPS_IN_A_ROW}" in message
    assert "optim.learning_rate" in message and "ppo." not in message
    assert f"The last checkpoint is {out / 'checkpoints' / f'step-{STEPS_IN_A_ROW - 1}'}" in message
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()
    weights = _checkpoint_weights(out, STEPS_IN_A_ROW - 1)
    assert all(torch.isfinite(t).all() for t in weights.values())


# The divergence rule itself ------------------------------------------------------------------------
def _watch(tmp_path: Path) -> DivergenceWatch:
    cfg = compose_train_config(["+recipe=smoke", f"output_dir={tmp_path}"])
    return DivergenceWatch(cfg, tmp_path)


def _ppo_stats(skipped: int, total: int = 4, loss: int = 0) -> dict:
    return {"ppo/nonfinite_minibatches": skipped, "ppo/minibatches": total, "ppo/nonfinite_loss_minibatches": loss}


def test_steps_with_skipped_minibatches_stop_the_run_only_in_a_row(tmp_path):
    watch = _watch(tmp_path)
    for step, skipped in enumerate([1, 1, 0, 1, 1], start=1):  # a clean step resets the count
        watch.after_step(step, _ppo_stats(skipped))
    with pytest.raises(DivergenceError, match=f"gradient norm was not finite in mini-batches of {STEPS_IN_A_ROW} steps in a row"):
        watch.after_step(6, _ppo_stats(1))


def test_a_step_whose_every_minibatch_was_skipped_stops_at_once(tmp_path):
    with pytest.raises(DivergenceError) as diverged:
        _watch(tmp_path).after_step(1, _ppo_stats(4, loss=4))
    message = str(diverged.value)
    assert "step 1: the loss was not finite in every one of its 4 mini-batches" in message
    assert "ppo.learning_rate" in message and "No checkpoint was written" in message


def test_nonfinite_weights_are_never_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    _watch(tmp_path).check_weights(model, 5, "final/")  # finite: nothing happens
    with torch.no_grad():
        model.bias[1] = math.inf
    with pytest.raises(DivergenceError, match=r"the weights are not finite \(bias\); final/ was not written"):
        _watch(tmp_path).check_weights(model, 5, "final/")


def test_nonfinite_sampling_is_divergence_and_other_errors_pass_through(tmp_path):
    watch = _watch(tmp_path)
    with pytest.raises(DivergenceError, match="logits were not finite during generation"):
        with watch.logits_guard(7):
            torch.multinomial(torch.tensor([[math.nan, 1.0]]), 1)
    with pytest.raises(RuntimeError, match="something else"):
        with watch.logits_guard(7):
            raise RuntimeError("something else")
