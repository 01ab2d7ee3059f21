"""FSDP2 on two CPU processes over gloo (``accelerate launch --config_file configs/accelerate/cpu_ddp.yaml``
with ``ppo.sharding=fsdp2``): the same code path a GPU launch runs over NCCL.

One launch (about a minute on two cores) runs :mod:`tests.distributed.fsdp2_harness` on both ranks;
the test process compares with the same steps on one unsharded process, by the rules of the DDP test
(:mod:`tests.distributed.test_two_processes`, :mod:`tests.tolerances`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.scenarios import STEPS, run_steps
from tests.distributed.test_two_processes import CPU_DDP, ROOT, _rtol, _stat_differences
from tests.tolerances import ADAM_RTOL, assert_same_branches, assert_same_update, update_differences

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from rlhf_cli.data.tokenizer import review_tokenizer

    review_tokenizer(1000)  # the smoke recipe's tokenizer, cached once here instead of trained by both ranks
    out = tmp_path_factory.mktemp("fsdp2")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
        "--main_process_port", "0", "-m", "tests.distributed.fsdp2_harness", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"2-process FSDP2 launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for result in results:
        result["out"] = out
    return results


def _sharded_scenarios(ranks) -> list[str]:
    return sorted(ranks[0]["scenarios"])


def test_fsdp2_with_half_the_batch_each_equals_one_unsharded_process_with_all(ranks):
    """Every scenario but LoRA: same branches, then the same updates and stats up to rounding."""
    assert ranks[0]["num_processes"] == 2 and len(_sharded_scenarios(ranks)) >= 6
    for name in _sharded_scenarios(ranks):
        reference = run_steps(name, process_index=0, num_processes=1)
        two = ranks[0]["scenarios"][name]
        assert_same_branches(reference["branches"], two["branches"])
        for step in range(STEPS):
            assert_same_update(reference["initial"], reference["weights"][step], two["weights"][step], _rtol(name), f"{name}, step {step}")
            problems = _stat_differences(name, reference["stats"][step], two["stats"][step])
            assert not problems, f"{name}, after step {step}: {problems}"
        # Gathered whole on each rank: both hold the same full weights.
        for step in range(STEPS):
            one, other = (r["scenarios"][name]["weights"][step] for r in ranks)
            assert all(torch.equal(one[k], other[k]) for k in one), f"{name}, step {step}"


def test_a_missing_times_p_in_the_gradient_scale_is_caught_under_fsdp2(ranks):
    for name, mutant in ranks[0]["mutants"].items():
        reference = run_steps(name, process_index=0, num_processes=1)
        try:
            assert_same_branches(reference["branches"], mutant["branches"])
        except AssertionError:
            continue  # a different branch is already a detected error
        assert update_differences(reference["initial"], reference["weights"][0], mutant["weights"][0], _rtol(name)), name


def test_generation_with_sharded_weights_finishes_on_both_ranks_with_their_own_lengths(ranks):
    """Rank 0 asked for 2 new tokens, rank 1 for 24: rank 0 kept stepping (synced_gpus) until rank 1
    was done, and each got the lengths it asked for (no EOS: every budget is used up)."""
    assert ranks[0]["lengths"] == [2, 2]
    assert ranks[1]["lengths"] == [24, 24]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def test_an_interrupted_fsdp2_run_resumed_matches_the_uninterrupted_one_bit_for_bit(ranks):
    """Checkpoint after step 2 (weights and Adam state gathered whole, rank 0 writes), a new launch
    shards them back: step 3 and the final weights are identical (same float order)."""
    engine = ranks[0]["engine"]
    assert engine["whole"]["sharded"] and engine["resumed"]["sharded"]
    whole, resumed = engine["whole"]["weights"], engine["resumed"]["weights"]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    out = ranks[0]["out"]
    assert [m["step"] for m in _metrics(out / "resumed")] == [1, 2, 3]
    assert _metrics(out / "whole") == _metrics(out / "resumed")
    assert not torch.equal(whole["v_head.summary.weight"], engine["first_two"]["weights"]["v_head.summary.weight"])


def _smoke_initial_weights() -> dict[str, torch.Tensor]:
    """The smoke recipe's policy as the engine builds it before training (same seed)."""
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.models import load_policy_and_tokenizer
    from rlhf_cli.seeding import set_seed

    cfg = compose_train_config(["+recipe=smoke"])
    set_seed(int(cfg.seed))
    policy, _ = load_policy_and_tokenizer(cfg.model, disable_dropout=True)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def test_final_is_a_plain_hugging_face_model_equal_to_the_trained_weights_and_to_ddps(ranks):
    """final/ of an FSDP2 run holds the gathered weights exactly and loads with AutoModelForCausalLM.
    After one step of the same rollout (same initial weights, same sampling seeds, so the same tokens)
    the FSDP2 run's weights equal an unsharded 2-process (DDP) run's by the update rule of
    tests/tolerances.py. (A 1-process run samples other tokens: its rank-0 seed covers the whole batch.)"""
    from transformers import AutoModelForCausalLM

    out, engine = ranks[0]["out"], ranks[0]["engine"]
    loaded = AutoModelForCausalLM.from_pretrained(out / "whole" / "final").state_dict()
    trained = engine["whole"]["weights"]
    for key, value in loaded.items():
        assert torch.equal(value, trained.get(key, trained["transformer.wte.weight"] if key == "lm_head.weight" else None)), key
    fsdp2, ddp = engine["one_step_fsdp2"], engine["one_step_ddp"]
    assert fsdp2["sharded"] and not ddp["sharded"]
    assert _metrics(out / "one-fsdp2")[0]["env/reward_mean"] == _metrics(out / "one-ddp")[0]["env/reward_mean"]
    initial = {k: v for k, v in _smoke_initial_weights().items() if k in fsdp2["weights"]}
    shared = {k: ddp["weights"][k] for k in fsdp2["weights"]}
    assert_same_update(initial, shared, fsdp2["weights"], ADAM_RTOL, "after one step")
    moved = max((shared[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4
