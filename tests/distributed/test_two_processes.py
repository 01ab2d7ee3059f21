"""Two processes over gloo on the CPU (``accelerate launch --config_file configs/accelerate/cpu_ddp.yaml``).

One launch (about 20–30 s, mostly process start-up) runs :mod:`tests.distributed.harness` on both
ranks: a whole smoke training run through the engine, then fixed-rollout PPO steps on each rank's
half of a batch. The test process computes the same steps on one process with the whole batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.scenarios import SCENARIOS, STEPS, checksum, make_trainer, run_steps

ROOT = Path(__file__).resolve().parents[2]
CPU_DDP = ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The two ranks' results (rank0.pt, rank1.pt) of one 2-process launch, plus its output directory."""
    from rlhf_cli.data.tokenizer import review_tokenizer

    review_tokenizer(1000)  # the smoke recipe's tokenizer, cached once here instead of trained by both ranks
    out = tmp_path_factory.mktemp("two-processes")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
        "--main_process_port", "0", "-m", "tests.distributed.harness", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"2-process launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for result in results:
        result["out"] = out
    return results


def test_engine_run_used_both_processes_one_run_directory_and_identical_weights(ranks):
    assert [r["train"]["num_processes"] for r in ranks] == [2, 2]
    assert [r["train"]["process_index"] for r in ranks] == [0, 1]
    assert ranks[0]["train"]["checksum"] == ranks[1]["train"]["checksum"]
    out = ranks[0]["out"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["run"]
    run = out / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # one writer: rank 0
    assert (run / "config.yaml").is_file() and (run / "final").is_dir()


@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_hold_identical_weights_after_every_step(ranks, name):
    for step in range(STEPS):
        weights = [r["scenarios"][name]["weights"][step] for r in ranks]
        assert checksum(weights[0]) == checksum(weights[1]), f"step {step}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_with_half_the_batch_each_equal_one_process_with_all(ranks, name):
    reference = run_steps(name, process_index=0, num_processes=1)
    initial = {k: v.detach().clone() for k, v in make_trainer(name, 1).model.state_dict().items()}
    two = ranks[0]["scenarios"][name]
    for step in range(STEPS):
        one_weights, two_weights = reference["weights"][step], two["weights"][step]
        assert one_weights.keys() == two_weights.keys()
        for key in one_weights:
            torch.testing.assert_close(two_weights[key], one_weights[key], atol=1e-5, rtol=0, msg=f"{key} after step {step}")
        one_stats, two_stats = reference["stats"][step], two["stats"][step]
        assert one_stats.keys() == two_stats.keys()
        for key in one_stats:
            assert two_stats[key] == pytest.approx(one_stats[key], rel=1e-4, abs=1e-5), f"{key} after step {step}"
    # The comparison means something: training moved the weights far beyond the tolerance.
    moved = max((reference["weights"][-1][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3
