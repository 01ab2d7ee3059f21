"""`reward.monitor=[...]` (issue 19): monitor values are logged per step and reported before/after,
and never optimised — a run with a monitor trains bit for bit like the same run without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

MONITOR = '''
import json
import os


def loud(prompts, responses):
    """A judge with large values that would dominate any advantage it entered; records what it returned."""
    scores = [100.0 * len(response) for response in responses]
    with open(os.environ["MONITOR_LOG"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(scores) + "\\n")
    return scores
'''


def _run(work: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MONITOR_LOG=str(work / f"{out}.jsonl"))
    args = [sys.executable, "-m", "rlhf_cli", "train", "+recipe=smoke", f"output_dir={out}", *extra]
    return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**load_file(run / "final" / "model.safetensors"), **load_file(run / "final" / "value_head.safetensors")}


def test_monitor_is_logged_and_never_optimised(tmp_path):
    (tmp_path / "monitor_module.py").write_text(MONITOR)
    plain = _run(tmp_path, "plain")
    watched = _run(tmp_path, "watched", "reward.monitor=[{type: callable, function: 'monitor_module:loud'}]")
    assert plain.returncode == 0 and watched.returncode == 0, watched.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    calls = [json.loads(line) for line in (tmp_path / "watched.jsonl").read_text().splitlines()]
    # One call per step on the step's responses, then two on the held-out before/after responses.
    for row, scores in zip(rows, calls):
        assert row["env/monitor/callable_mean"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    assert len(calls) == len(rows) + 2
    # Never in the advantages: the same weights and the same optimised reward as without the monitor.
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["env/reward_mean"] for r in rows] == [r["env/reward_mean"] for r in plain_rows]
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "watched")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert "monitor callable (not optimised): held-out mean" in (tmp_path / "watched" / "report.md").read_text()
