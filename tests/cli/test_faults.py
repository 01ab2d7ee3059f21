"""Faults a long run meets after it started (issue 25): a second writer, divergence, a full disk.

The run-directory lock and the write guard are tested in-process (fast); a diverging run and a disk
that fills at a checkpoint are `rlhf train` subprocesses on the smoke recipe (slow). The second start
beside a running run is in test_checkpoints.py (it compares with that module's uninterrupted run), a
rank that fails alone in test_multiprocess.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_cli.engine.disk import WriteError, guarded_write, remove_tree, truncate_to
from rlhf_cli.engine.run_lock import LOCK_NAME, RunLockedError, acquire
from rlhf_cli.reporting import NONFINITE_FIELD, metrics_line
from tests.cli.test_cli_errors import cli_env

SMOKE = "+recipe=smoke"


# The lock ------------------------------------------------------------------------------------------
def test_a_second_holder_is_refused_with_the_first_named_and_release_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    first = acquire(run)
    with pytest.raises(RunLockedError) as refused:
        acquire(run, command="rlhf eval")
    message = str(refused.value)
    assert f"PID {os.getpid()}" in message and "rlhf train" in message and "another output_dir" in message
    first.release()
    assert not run.exists(), "released: no lock file, and the directory the lock created is gone"
    run.mkdir()
    acquire(run).release()  # free again; a directory that existed before stays
    assert list(run.iterdir()) == []


def test_a_refused_or_failed_start_removes_the_directory_it_created(tmp_path):
    holder = acquire(tmp_path / "held")
    with pytest.raises(RunLockedError):
        acquire(tmp_path / "held")
    assert (tmp_path / "held" / LOCK_NAME).exists(), "the refusal does not touch the holder's file"
    holder.release()
    acquire(tmp_path / "new" / "run").release()  # created for the lock, empty after it: removed
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_holder_leaves_no_lock(tmp_path):
    """kill -9 leaves the file behind, but the kernel dropped the lock: the next start takes it."""
    run = tmp_path / "run"
    code = f"import sys, time; from rlhf_cli.engine.run_lock import acquire; acquire({str(run)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            acquire(run)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (run / LOCK_NAME).exists()
    acquire(run).release()


def test_eval_on_a_running_run_is_refused(tmp_path):
    from rlhf_cli.engine.evaluate import evaluate_run

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "final" / "config.json").write_text("{}")
    holder = acquire(run)
    try:
        with pytest.raises(RunLockedError, match="rlhf eval"):
            evaluate_run(run)
    finally:
        holder.release()


# Writes ----------------------------------------------------------------------------------------------
def test_a_failed_append_cuts_the_file_back_and_names_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    size = path.stat().st_size
    with pytest.raises(WriteError) as failed:
        with guarded_write(path, "metrics.jsonl", needed=100, undo=truncate_to(path, size), advice="Free some space."):
            with path.open("a") as handle:
                handle.write('{"step": 2, "torn')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    message = str(failed.value)
    assert str(path) in message and "the disk is full" in message and "free on that filesystem" in message
    assert "needs about 100 bytes" in message and message.endswith("Free some space.")
    assert path.read_text() == '{"step": 1}\n'


def test_another_error_is_a_full_disk_only_when_the_disk_is_short(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    with pytest.raises(RuntimeError, match="a bug"):  # plenty of space: a bug keeps its traceback
        with guarded_write(target, "checkpoint", needed=1, undo=remove_tree(target), advice=""):
            raise RuntimeError("a bug")
    assert target.exists()
    with pytest.raises(WriteError, match="unexpected pos"):  # torch.save's zip writer on a full disk
        with guarded_write(target, "checkpoint", needed=2**62, undo=remove_tree(target), advice=""):
            raise RuntimeError("enforce fail at inline_container.cc:123] . unexpected pos 128 vs 64")
    assert not target.exists()


def test_a_null_in_a_metrics_line_says_why():
    row = json.loads(metrics_line(3, {"ppo/loss/total": math.nan, "objective/kl": 0.5, "env/reward_mean": math.inf}))
    assert row["ppo/loss/total"] is None and row["env/reward_mean"] is None and row["objective/kl"] == 0.5
    assert row[NONFINITE_FIELD] == ["ppo/loss/total", "env/reward_mean"]
    assert NONFINITE_FIELD not in json.loads(metrics_line(4, {"objective/kl": 0.5}))


# The guard in the library's step() ------------------------------------------------------------------
def test_step_skips_a_nonfinite_minibatch_and_says_so(word_tokenizer, monkeypatch, one_thread):
    """One mini-batch's loss made NaN: its update is skipped (no NaN reaches the weights), the others
    apply, the stats count it and leave it out of the means, and step() warns."""
    import rlhf_cli.ppo.minibatch as minibatch_module
    from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from tests.tiny import make_tiny_gpt2

    torch.manual_seed(0)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer))
    config = PPOConfig(batch_size=8, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3, seed=0)
    trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer)
    real, calls = minibatch_module.policy_loss, []

    def nan_in_second(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        return result._replace(loss=result.loss * math.nan) if len(calls) == 2 else result

    monkeypatch.setattr(minibatch_module, "policy_loss", nan_in_second)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    queries = [torch.randint(3, len(word_tokenizer), (4,), generator=gen) for _ in range(8)]
    responses = [torch.randint(3, len(word_tokenizer), (3,), generator=gen) for _ in range(8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = trainer.step(queries, responses, [torch.tensor(1.0)] * 8)
    assert stats["ppo/nonfinite_minibatches"] == 1 and stats["ppo/nonfinite_loss_minibatches"] == 1
    assert stats["ppo/minibatches"] == 4
    assert math.isfinite(stats["ppo/loss/total"]) and math.isfinite(stats["ppo/policy/entropy"])
    assert any("not finite in 1 of 4 mini-batch" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert any(not torch.equal(before[name], p) for name, p in policy.named_parameters()), "the other three applied"


# Trackers ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("reward, starts", [("raises", False), ("fine", True)])
def test_trackers_start_only_once_the_first_reward_call_succeeded(tmp_path, monkeypatch, one_thread, reward, starts):
    """A start whose first reward call fails never creates the trackers (nothing under trackers/)."""
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.engine import train
    from rlhf_cli.errors import RewardError

    (tmp_path / "rewards_25.py").write_text("def raises(p, r):\n    raise ValueError('no')\n\n"
                                            "def fine(p, r):\n    return [0.5] * len(p)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    started = []
    monkeypatch.setattr(train._EngineTrainer, "start_trackers", lambda self: started.append(True))
    cfg = compose_train_config([SMOKE, f"output_dir={tmp_path / 'run'}", "reward=callable", f"reward.function=rewards_25:{reward}"])
    if starts:
        train.TrainingRun(cfg).lock.release()
    else:
        with pytest.raises(RewardError):
            train.TrainingRun(cfg)
        assert not (tmp_path / "run").exists()
    assert started == ([True] if starts else [])


# Whole runs ---------------------------------------------------------------------------------------
def _rlhf(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", "train", SMOKE, *args], cwd=cwd,
                          env=cli_env(OMP_NUM_THREADS="1", PYTHONPATH=f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_paragraph_and_no_nan_written(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    done = _rlhf(f"output_dir={out}", "ppo.learning_rate=1e4", "checkpoint.every=1", "steps=6", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    message = " ".join(done.stderr.split())
    assert "Error: Training diverged at step" in message and "ppo.learning_rate" in message, message
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and f"The last checkpoint is {checkpoints[-1]}" in message
    weights = load_file(checkpoints[-1] / "weights.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row["ppo/nonfinite_minibatches"] > 0 for row in rows)
    for row in rows:  # a null always comes with the field that names it
        nulls = sorted(key for key, value in row.items() if value is None)
        assert nulls == sorted(row.get(NONFINITE_FIELD, [])), row


DISK_FULL = '''
import errno, os
from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.rewards.lexicon import VaderReward

_vader, _write = VaderReward(), ckpt.write_main_files


def _full_at(tmp_dir, **kwargs):
    """The disk fills while step FULL_AT_STEP's checkpoint is written: a weights file half out."""
    if kwargs["loop"].step >= int(os.environ.get("FULL_AT_STEP", "1000000")):
        (tmp_dir / "weights.safetensors").write_bytes(b"\\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir / "trainer.pt"))
    return _write(tmp_dir, **kwargs)


ckpt.write_main_files = _full_at


def score(prompts, responses):
    return list(_vader(prompts, responses))
'''


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_a_message_and_resume_works_after(tmp_path):
    (tmp_path / "disk_full.py").write_text(DISK_FULL)
    out = tmp_path / "run"
    args = (f"output_dir={out}", "checkpoint.every=1", "steps=4", "eval_prompts=0", "reward=callable",
            "reward.function=disk_full:score")
    full = _rlhf(*args, cwd=tmp_path, FULL_AT_STEP="3")
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr
    message = " ".join(full.stderr.split())
    for fragment in ("Could not write checkpoint step-3", "trainer.pt", "the disk is full", "No space left on device",
                     "free on that filesystem", "needs about", f"newest: {out / 'checkpoints' / 'step-2'}",
                     "checkpoint.resume=auto"):
        assert fragment in message, message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no .tmp-step-3
    assert not (out / "final").exists() and not (out / LOCK_NAME).exists()
    resumed = _rlhf(*args, "checkpoint.resume=auto", cwd=tmp_path)  # space freed
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").is_file()
