"""`accelerate launch --multi_gpu --num_processes 2 -m rlhf_cli train +recipe=smoke` (issue 3, item 7).

On this GPU-less machine the two processes are joined over gloo on the CPU. The reward is a recording
function, so the test sees what each process scored: each got half of every global batch, and the
logged mean covers both halves. Only rank 0 writes: one run directory, one metrics line per step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

RECORDING_REWARD = '''
import json
import os


def record(prompts, responses):
    """Response length in characters / 10, appended to REWARD_LOG_DIR/rank<RANK>.jsonl with the process id."""
    scores = [len(response) / 10 for response in responses]
    path = os.path.join(os.environ["REWARD_LOG_DIR"], f"rank{os.environ['RANK']}.jsonl")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "scores": scores}) + "\\n")
    return scores
'''

# Every option `accelerate launch` would otherwise default with a warning on stderr; port 0 lets the
# launcher pick a free one, so two launches (pytest -n 2) never meet on the default 29500.
LAUNCH = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.mark.slow
def test_two_processes_share_one_run_directory_and_split_each_batch(tmp_path: Path) -> None:
    work, logs, module_dir, scratch = (tmp_path / name for name in ("work", "logs", "module", "tmp"))
    for path in (work, logs, module_dir, scratch):
        path.mkdir()
    (module_dir / "recording_reward.py").write_text(textwrap.dedent(RECORDING_REWARD), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(module_dir),
               REWARD_LOG_DIR=str(logs), TMPDIR=str(scratch), OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(accelerate), *LAUNCH, "-m", "rlhf_cli", "train", "+recipe=smoke", "output_dir=run", "eval_prompts=0",
         "reward=callable", "reward.function=recording_reward:record"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    # One run directory, where the command line said; rank 1 left nothing in the working directory.
    assert [p.name for p in work.iterdir()] == ["run"]
    assert not list(scratch.glob("rlhf-rank*")), "rank 1's scratch Hydra directory is removed"
    run_dir = work / "run"
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.output_dir == str(run_dir)
    assert (run_dir / "final" / "config.json").is_file()

    # Each process scored its half of every global batch of 8, once per step.
    calls = {rank: [json.loads(line) for line in (logs / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}
    assert calls[0][0]["pid"] != calls[1][0]["pid"]
    assert len(calls[0]) == len(calls[1]) == cfg.steps == 3
    assert all(len(call["scores"]) == cfg.ppo.batch_size // 2 for rank in (0, 1) for call in calls[rank])

    # One metrics line per step, and its reward mean is over both processes' samples.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for step, m in enumerate(metrics):
        scores = calls[0][step]["scores"] + calls[1][step]["scores"]
        assert m["env/reward_mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)

    # Only rank 0 prints: one stats line per step.
    assert sum(line.lstrip().startswith("step    1 ") for line in done.stdout.splitlines()) == 1


FAILS_ON_RANK_1 = '''
import os
from rlhf_cli.rewards.lexicon import VaderReward

_vader, _calls = VaderReward(), [0]


def score(prompts, responses):
    """VADER, except that rank 1's second call raises (step 2's rollout: the run has started)."""
    _calls[0] += 1
    if os.environ["RANK"] == "1" and _calls[0] == 2:
        raise ZeroDivisionError("rank one's reward broke")
    return list(_vader(prompts, responses))
'''


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_both_with_one_message(tmp_path: Path) -> None:
    """Both processes stop at once (the ranks agree after each rollout), the failing rank's message is
    printed once, and no rank dies at a collective (no peer-closed error, no traceback from our code)."""
    work, module_dir = tmp_path / "work", tmp_path / "module"
    for path in (work, module_dir):
        path.mkdir()
    (module_dir / "fails_on_rank_1.py").write_text(FAILS_ON_RANK_1, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    # The code under test first (the checkout's, not an installed copy), then the reward's module.
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(module_dir)) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(accelerate), *LAUNCH, "-m", "rlhf_cli", "train", "+recipe=smoke", "output_dir=run", "eval_prompts=0",
         "reward=callable", "reward.function=fails_on_rank_1:score"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,  # a hang at a collective would time out
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("rank one's reward broke") == 1, output[-4000:]
    assert "Connection closed by peer" not in output and "rlhf_cli/" not in output, output[-4000:]
    # Each rank stopped by itself with the usage-error code; torchrun may SIGTERM (-15) the one still
    # shutting down when the other's exit reaches it first. Never exit code 1 (an unhandled error).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)
    assert codes and set(codes) <= {"2", "-15"} and "2" in codes, codes
    assert [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (work / "run" / ".rlhf.lock").exists()


@pytest.mark.slow
def test_a_launch_check_error_is_printed_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(accelerate), *LAUNCH, "-m", "rlhf_cli", "train", "+recipe=smoke", "output_dir=run",
         "ppo.batch_size=6", "ppo.mini_batch_size=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    output = done.stdout + done.stderr
    assert output.count("is not divisible by the 2 processes") == 1, output[-4000:]
    assert "rlhf_cli/" not in output and not (tmp_path / "run").exists(), output[-4000:]
