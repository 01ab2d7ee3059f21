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

from tests.distributed.scenarios import MUTANTS, SCENARIOS, STEPS, checksum, global_batch, run_steps
from tests.tolerances import ADAM_RTOL, SGD_RTOL, assert_same_branches, assert_same_update, update_differences

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


def _rtol(name: str) -> float:
    if "rtol" in SCENARIOS[name]:
        return SCENARIOS[name]["rtol"]
    return ADAM_RTOL if SCENARIOS[name]["optimizer"] == "adam" else SGD_RTOL


def _clip_fraction_slack(name: str) -> float:
    """How far a clip fraction may move when rounding carries one token across the clip boundary:
    one token of the smallest mini-batch (a fraction counts tokens; it has no rounding margin)."""
    global_mini_batch = SCENARIOS[name]["config"]["mini_batch_size"]
    masked = SCENARIOS[name].get("response_masks", False)  # the first token of longer responses is masked out
    tokens = lambda response: max(len(response) - masked, 1)  # noqa: E731
    smallest = min(sum(sorted(map(tokens, global_batch(step)[1]))[:global_mini_batch]) for step in range(STEPS))
    return 1.0 / smallest


def _stat_differences(name: str, one: dict, two: dict) -> list[str]:
    """Scalar stats that differ by more than rounding: clip fractions by more than one token's flip,
    the rest by more than the update tolerance (they are computed from weights that differ that much)."""
    if one.keys() != two.keys():
        return [f"different stats: {sorted(set(one) ^ set(two))}"]
    problems = []
    for key in one:
        if key.endswith("clipfrac"):
            close = abs(two[key] - one[key]) <= _clip_fraction_slack(name)
        else:
            close = two[key] == pytest.approx(one[key], rel=_rtol(name), abs=1e-6)
        if not close:
            problems.append(f"{key}: {two[key]} vs {one[key]}")
    return problems


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_with_half_the_batch_each_equal_one_process_with_all(ranks, name):
    """Same branches, then the same updates and stats up to rounding (rules in tests/tolerances.py)."""
    reference = run_steps(name, process_index=0, num_processes=1)
    two = ranks[0]["scenarios"][name]
    assert_same_branches(reference["branches"], two["branches"])
    initial = reference["initial"]
    for step in range(STEPS):
        assert_same_update(initial, reference["weights"][step], two["weights"][step], _rtol(name), f"after step {step}")
        problems = _stat_differences(name, reference["stats"][step], two["stats"][step])
        assert not problems, f"after step {step}: {problems}"
    # The comparison means something: training moved the weights far beyond the tolerance.
    moved = max((reference["weights"][-1][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3


@pytest.mark.parametrize("name", ["accumulation", "adam"])
def test_the_tolerance_absorbs_rounding_far_larger_than_any_cpu_makes(name):
    """Every gradient entry perturbed by a relative 1e-5 (≈ 170 float32 roundings, about the
    √n·u a reordered sum of 10⁴ terms gives) at every update: same branches, updates within tolerance."""
    clean = run_steps(name, process_index=0, num_processes=1)
    noisy = run_steps(name, process_index=0, num_processes=1, gradient_noise=1e-5)
    assert_same_branches(clean["branches"], noisy["branches"])
    for step in range(STEPS):
        assert_same_update(clean["initial"], clean["weights"][step], noisy["weights"][step], _rtol(name), f"after step {step}")
        assert not torch.equal(clean["weights"][step]["v_head.summary.weight"], noisy["weights"][step]["v_head.summary.weight"])


@pytest.mark.parametrize("name", MUTANTS)
def test_a_missing_times_p_in_the_gradient_scale_is_caught(ranks, name):
    """The tolerances above are loose enough for any CPU's rounding but not for a real error: the
    same 2-process run with its loss not multiplied by P (gradients half the right size) fails the
    comparison — in its branches or in its weights."""
    reference = run_steps(name, process_index=0, num_processes=1)
    mutant = ranks[0]["mutants"][name]
    try:
        assert_same_branches(reference["branches"], mutant["branches"])
    except AssertionError:
        return  # a different branch (e.g. an early stop taken elsewhere) is already a detected error
    first = update_differences(reference["initial"], reference["weights"][0], mutant["weights"][0], _rtol(name))
    assert first, "a halved gradient passed the comparison: the tolerance is too loose"
