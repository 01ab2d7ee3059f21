"""Two processes over gloo on the CPU (``accelerate launch --config_file configs/accelerate/cpu_ddp.yaml``).

One launch (about 20–30 s, mostly process start-up) runs :mod:`tests.distributed.harness` on both
ranks: a whole smoke training run through the engine, then fixed-rollout PPO steps on each rank's
half of a batch. The test process computes the same steps on one process with the whole batch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.scenarios import (
    CRITIC_FREE,
    GLOBAL_BATCH,
    MUTANTS,
    SCENARIOS,
    STEPS,
    checksum,
    global_batch,
    group_size,
    run_steps,
    split_group_refusal,
)
from tests.tolerances import (
    ADAM_RTOL,
    SGD_RTOL,
    assert_same_branches,
    assert_same_update,
    signed_mean_rtol,
    update_differences,
)

ROOT = Path(__file__).resolve().parents[2]
CPU_DDP = ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"
# approxkl = ½·mean(log r²), so √(2·approxkl) is the rms of the log-ratios policykl averages.
POLICYKL, APPROXKL = "ppo/policy/policykl", "ppo/policy/approxkl"

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
    responses = [global_batch(step, group_size(name))[1] for step in range(STEPS)]
    smallest = min(sum(sorted(map(tokens, step_responses))[:global_mini_batch]) for step_responses in responses)
    return 1.0 / smallest


def _stat_differences(name: str, one: dict, two: dict) -> list[str]:
    """Scalar stats that differ by more than rounding: clip fractions by more than one token's flip,
    the rest by more than the update tolerance (they are computed from weights that differ that much),
    policykl by that times its cancellation factor (tests/tolerances.py)."""
    if one.keys() != two.keys():
        return [f"different stats: {sorted(set(one) ^ set(two))}"]
    problems = []
    for key in one:
        if key.endswith("clipfrac"):
            close = abs(two[key] - one[key]) <= _clip_fraction_slack(name)
        else:
            rtol = _rtol(name)
            if key == POLICYKL:  # a signed mean whose terms cancel: rounded relative to the log-ratios' size
                rtol = signed_mean_rtol(rtol, one[key], math.sqrt(2 * one[APPROXKL]))
            close = two[key] == pytest.approx(one[key], rel=rtol, abs=SCENARIOS[name].get("stat_atol", 1e-6))
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


@pytest.mark.parametrize("name", [name for name in SCENARIOS if group_size(name) > 1])
def test_each_process_received_whole_groups_of_one_prompt(ranks, name):
    """The harness asserted on each rank that its rows are whole prompt groups (G adjacent responses
    to one query); together the two ranks hold every group of the global batch exactly once."""
    groups = GLOBAL_BATCH // group_size(name)
    held = [r["scenarios"][name]["groups"] for r in ranks]
    assert [len(h) for h in held] == [groups // 2] * 2
    assert sorted(held[0] + held[1]) == list(range(groups))


def test_a_per_process_share_that_splits_a_group_is_refused(ranks):
    """A global batch of three groups of four is fine on one process but would give each of two
    processes one and a half groups: the per-process trainer refuses it, naming the numbers and the fix."""
    assert split_group_refusal(num_processes=1) is None
    for rank in ranks:
        message = rank["split_group_refusal"]
        assert message is not None, "a per-process batch of 6 with samples_per_prompt=4 was accepted"
        for text in ("batch_size=6", "samples_per_prompt=4", "multiple of 4"):
            assert text in message, (text, message)


@pytest.mark.parametrize("name", CRITIC_FREE)
def test_critic_free_estimators_leave_the_value_head_alone_on_both_ranks(ranks, name):
    """No value-head update and no optimiser state for it (the optimiser was given every parameter,
    the value head's too), on each rank after each step; the rest of the model did train."""
    for rank in ranks:
        result = rank["scenarios"][name]
        initial = result["initial"]
        head = [key for key in initial if key.startswith("v_head.")]
        assert head, sorted(initial)
        for step, weights in enumerate(result["weights"]):
            changed = [key for key in head if not torch.equal(weights[key], initial[key])]
            assert not changed, f"rank {rank['train']['process_index']}, step {step}: the value head moved: {changed}"
        stateful = result["optimizer_state"]
        assert stateful and not [n for n in stateful if n.startswith("v_head.")], stateful


def test_the_grpo_scenario_runs_the_kl_loss_instead_of_the_reward_penalty(ranks):
    """What the equivalence of the grpo scenario covers: no reward-side β, a KL loss term that grew
    large enough to matter by the second step (its gradient is zero while policy = reference)."""
    stats = ranks[0]["scenarios"]["grpo"]["stats"]
    assert all(step["objective/kl_coef"] == 0.0 for step in stats)
    assert stats[-1]["objective/kl_loss_coef"] == SCENARIOS["grpo"]["config"]["kl_loss_coef"]
    assert stats[-1]["ppo/loss/kl"] > 0.01
    assert not [key for key in stats[-1] if key.startswith("ppo/val/")]
