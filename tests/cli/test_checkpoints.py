"""Checkpoints, exact resume (also after kill -9 and SIGTERM), keep-last-K, export, eval, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_cli.engine.signals import PREEMPTED_EXIT_CODE
from rlhf_cli.ppo.precision import cpu_supports_bf16

STEPS = 6
# A reward that takes a moment, so a signal or kill lands between steps rather than after the run.
SLOW_REWARD = '''
import time
from rlhf_cli.rewards.lexicon import VaderReward
_vader = VaderReward()
def score(prompts, responses, delay=0.3):
    time.sleep(delay)
    return list(_vader(prompts, responses))
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    (path / "slow_reward.py").write_text(SLOW_REWARD)
    return path


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(workdir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "rlhf_cli", "train", "+recipe=smoke", f"output_dir={out}", f"steps={STEPS}",
        "checkpoint.every=2", "reward=callable", "reward.function=slow_reward:score", *extra,
    ]


def _run(workdir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(out, *extra), cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields (the only ones that may differ between runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(run_dir / "final" / "model.safetensors")
    weights.update(load_file(run_dir / "final" / "value_head.safetensors"))
    return weights


def _wait_for_lines(run_dir: Path, n: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


@pytest.fixture(scope="module")
def uninterrupted(workdir: Path) -> Path:
    out = workdir / "uninterrupted"
    result = _run(workdir, out)
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [row["step"] for row in mb] == list(range(1, STEPS + 1))
    assert ma == mb  # bit for bit: JSON floats round-trip exactly
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_kill_9_then_resume_matches_uninterrupted(workdir, uninterrupted):
    out = workdir / "killed"
    process = subprocess.Popen(_args(out), cwd=workdir, env=_env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 3, process)  # step 3 logged: checkpoint step-2 exists, step 3 will be lost
    process.kill()
    process.wait()
    assert len(_metrics(out)) >= 3
    assert (out / ".rlhf.lock").exists(), "kill -9 leaves the lock file, but the kernel released its lock"
    resumed = _run(workdir, out, "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    _assert_same_run(uninterrupted, out)


def test_sigterm_checkpoints_and_exits_then_resumes_exactly(workdir, uninterrupted):
    out = workdir / "terminated"
    process = subprocess.Popen(_args(out), cwd=workdir, env=_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 1, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr
    assert "checkpoint.resume=auto" in " ".join(stderr.split())
    assert "Traceback" not in stderr
    stopped_at = len(_metrics(out))
    assert stopped_at < STEPS
    assert (out / "checkpoints" / f"step-{stopped_at}" / "weights.safetensors").is_file()
    resumed = _run(workdir, out, "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, out)


GATED_REWARD = '''
import os, time
from rlhf_cli.rewards.lexicon import VaderReward
_vader, _calls = VaderReward(), [0]
def score(prompts, responses):
    """VADER; the third call waits until the file GATE exists (the run stays alive that long)."""
    _calls[0] += 1
    while _calls[0] == 3 and not os.path.exists(os.environ["GATE"]):
        time.sleep(0.05)
    return list(_vader(prompts, responses))
'''


def test_a_second_start_on_a_running_run_is_refused_and_changes_nothing(workdir, uninterrupted):
    """A scheduler retrying a job whose first attempt is alive: the retry is refused with the holder
    named, and the first run's files come out as an undisturbed run's."""
    (workdir / "gated_reward.py").write_text(GATED_REWARD)
    out, gate = workdir / "two_starts", workdir / "gate"
    env = dict(_env(workdir), GATE=str(gate))
    args = [a.replace("slow_reward:", "gated_reward:") for a in _args(out)]
    first = subprocess.Popen(args, cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(out, 2, first)  # step 3's rollout waits at the gate: the run is alive
        second = subprocess.run([*args, "checkpoint.resume=auto"], cwd=workdir,
                                env=env, capture_output=True, text=True, timeout=300)
    finally:
        gate.write_text("open")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr
    message = " ".join(second.stderr.split())
    assert f"is in use by rlhf train (PID {first.pid} on" in message and "Traceback" not in message, message
    _assert_same_run(uninterrupted, out)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [p.name for p in sorted((uninterrupted / "checkpoints").iterdir())]
    for step in (out / "checkpoints").iterdir():
        mine, solo = step / "weights.safetensors", uninterrupted / "checkpoints" / step.name / "weights.safetensors"
        assert mine.read_bytes() == solo.read_bytes(), step.name
    assert not (out / ".rlhf.lock").exists()


def test_keep_last_k_and_temporary_directories_are_ignored(workdir, uninterrupted):
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == ["step-4", "step-6"]  # every 2 steps, keep 2
    out = workdir / "leftover"
    shutil.copytree(uninterrupted, out)
    partial = out / "checkpoints" / ".tmp-step-8"
    partial.mkdir()
    (partial / "state.json").write_text("{not json")
    from rlhf_cli.engine.checkpoint import list_checkpoints, resolve_resume

    assert [p.name for p in list_checkpoints(out)] == ["step-4", "step-6"]
    assert resolve_resume("auto", out).name == "step-6"


def test_incompatible_resume_is_refused_and_writes_nothing(workdir, uninterrupted):
    out = workdir / "refused"
    shutil.copytree(uninterrupted, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = _run(workdir, out, "checkpoint.resume=auto", "ppo.batch_size=4", "model.tiny.n_embd=32", "steps=8")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "ppo.batch_size: 8 → 4" in message and "model.tiny.n_embd: 64 → 32" in message
    assert "steps" not in message.split("—")[1]  # a harmless change is not listed as breaking
    assert "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}
    for path, content in after.items():
        assert before.get(path) == content, f"{path} was changed"


def test_harmless_change_is_allowed_and_reported(workdir, uninterrupted):
    out = workdir / "longer"
    shutil.copytree(uninterrupted, out)
    result = _run(workdir, out, "checkpoint.resume=auto", "steps=7", "logging.log_every=2")
    assert result.returncode == 0, result.stderr
    assert "changed (harmless): steps: 6 → 7" in result.stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[:STEPS] == _metrics(uninterrupted)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ckpt: (ckpt / "trainer.pt").unlink(), "not a complete checkpoint: trainer.pt missing"),
        (lambda ckpt: (ckpt / "weights.safetensors").write_bytes(b"\x00" * 16), "weights.safetensors is corrupt"),
        (lambda ckpt: (ckpt / "state.json").write_text("{"), "is corrupt"),
    ],
)
def test_damaged_checkpoint_gets_a_clear_message(workdir, uninterrupted, damage, message, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(uninterrupted, source)
    checkpoint = source / "checkpoints" / "step-4"
    damage(checkpoint)
    out = tmp_path / "target"
    result = _run(workdir, out, f"checkpoint.resume={checkpoint}")
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (out / "metrics.jsonl").exists()


def test_missing_checkpoint_path(workdir, tmp_path):
    result = _run(workdir, tmp_path / "x", f"checkpoint.resume={tmp_path / 'nope'}")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_of_another_model_is_refused(workdir, uninterrupted, tmp_path):
    """Pointing a differently sized model at a checkpoint: the config check names the keys."""
    result = _run(workdir, tmp_path / "other", f"checkpoint.resume={uninterrupted / 'checkpoints' / 'step-6'}", "model.tiny.n_layer=3")
    assert result.returncode == 2
    assert "model.tiny.n_layer: 2 → 3" in " ".join(result.stderr.split())


def test_weights_of_another_model_are_refused(uninterrupted, tmp_path):
    from rlhf_cli.engine.checkpoint import CheckpointError, load_weights
    from rlhf_cli.models import AutoModelForCausalLMWithValueHead
    from tests.tiny import make_tiny_gpt2, make_word_tokenizer

    other = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(make_word_tokenizer(), n_embd=32))
    with pytest.raises(CheckpointError, match="was made for a different model"):
        load_weights(uninterrupted / "checkpoints" / "step-6", other)


def test_final_and_export_load_with_transformers_and_generate(workdir, uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_cli", "export", str(uninterrupted / "checkpoints" / "step-6"), str(exported)],
        cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    final_model = AutoModelForCausalLM.from_pretrained(uninterrupted / "final")
    exported_model = AutoModelForCausalLM.from_pretrained(exported)
    for (name, a), (_, b) in zip(final_model.state_dict().items(), exported_model.state_dict().items()):
        assert torch.equal(a, b), name  # step-6 is the last step: export == final
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("this movie", return_tensors="pt")
    out = exported_model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_report_and_curves_come_from_the_run(workdir, uninterrupted):
    report = (uninterrupted / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "**mean" not in line and "prompt |" not in line]
    assert len(rows) == 2  # smoke: eval_prompts=2
    before = [float(r.split("|")[3]) for r in rows]
    after = [float(r.split("|")[5]) for r in rows]
    mean_row = next(line for line in report.splitlines() if "**mean ± SE**" in line)
    mean_before, mean_after = (float(cell.strip(" *").split(" ± ")[0]) for cell in (mean_row.split("|")[3], mean_row.split("|")[5]))
    assert mean_before == pytest.approx(sum(before) / 2, abs=1e-4)  # rows are rounded to 4 places
    assert mean_after == pytest.approx(sum(after) / 2, abs=1e-4)
    rewards = [json.loads(line)["env/reward_mean"] for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert f"{rewards[0]:+.4f}" in report and f"{rewards[-1]:+.4f}" in report
    png = (uninterrupted / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # `rlhf eval` recomputes the same comparison (same seed, same weights).
    copy = workdir / "evaluated"
    shutil.copytree(uninterrupted, copy)
    (copy / "report.md").unlink()
    result = subprocess.run([sys.executable, "-m", "rlhf_cli", "eval", str(copy)], cwd=workdir, env=_env(workdir),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (copy / "report.md").read_text().split("\n", 1)[1] == report.split("\n", 1)[1]


@pytest.mark.skipif(not cpu_supports_bf16(), reason="ppo.precision=bf16 is refused on a CPU without native bfloat16 "
                    "(AVX-512 BF16 or AMX); tests/integration/test_precision.py checks the masters' state on any CPU")
def test_bf16_precision_resumes_bit_exactly(workdir, tmp_path):
    """precision=bf16: the checkpoint carries the float32 masters and Adam moments, so a run stopped
    after step 2 and resumed equals the uninterrupted 4-step run bit for bit (metrics and weights)."""
    common = ["+recipe=smoke", "reward=vader", "ppo.precision=bf16", "checkpoint.every=2"]

    def run(out: Path, steps: int, *extra: str) -> None:
        args = [sys.executable, "-m", "rlhf_cli", "train", *common, f"output_dir={out}", f"steps={steps}", *extra]
        result = subprocess.run(args, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr

    run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step-2" / "trainer.pt", weights_only=True)
    assert {m.dtype for m in saved["optimizer"]["masters"]} == {torch.float32}
    run(tmp_path / "split", 4, "checkpoint.resume=auto")
    ma, mb = _metrics(tmp_path / "whole"), _metrics(tmp_path / "split")
    assert [row["step"] for row in mb] == [1, 2, 3, 4] and ma == mb
    wa, wb = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "split")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert wa["transformer.wte.weight"].dtype == torch.bfloat16  # final/ holds the bf16 weights


def test_precision_auto_is_resolved_once_recorded_and_kept_on_resume(workdir, tmp_path):
    """ppo.precision=auto: the run's config.yaml (and its checkpoints') record the precision it resolved
    to on this machine, the fallback notice is printed once, and a resumed run (auto again) continues
    in the recorded precision without a config change being reported."""
    from omegaconf import OmegaConf

    from rlhf_cli.ppo.precision import resolve_precision

    expected, notice = resolve_precision("auto", "cpu")  # this machine's answer: fp32 here unless AVX-512 BF16/AMX
    common = ["+recipe=smoke", "reward=vader", "ppo.precision=auto", "checkpoint.every=2", f"output_dir={tmp_path / 'run'}"]

    def run(steps: int, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "rlhf_cli", "train", *common, f"steps={steps}", *extra]
        result = subprocess.run(args, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    first = run(2)
    assert (first.stdout + first.stderr).count("ppo.precision=auto: training in fp32") == (1 if notice else 0)
    recorded = OmegaConf.load(tmp_path / "run" / "config.yaml").ppo.precision
    assert recorded == expected
    assert OmegaConf.load(tmp_path / "run" / "checkpoints" / "step-2" / "config.yaml").ppo.precision == expected
    resumed = run(3, "checkpoint.resume=auto")
    assert "ppo.precision" not in resumed.stdout  # no "changed" line: the resolved value is the checkpoint's
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").ppo.precision == expected


def test_cfg_job_shows_the_recipes_precision_setting(workdir):
    result = subprocess.run([sys.executable, "-m", "rlhf_cli", "train", "+recipe=smollm2_imdb", "--cfg", "job"],
                            cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "  precision: auto\n" in result.stdout and "  mixed_precision: null\n" in result.stdout
