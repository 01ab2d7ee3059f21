"""RunningMoments against numpy over all values seen so far."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhf_cli.algo.running_moments import RunningMoments


def test_starts_from_the_prior():
    running = RunningMoments()
    assert (running.mean, running.var, running.std, running.count) == (0.0, 1.0, 1.0, 1e-24)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_over_all_values_seen(seed):
    rng = np.random.default_rng(seed)
    running = RunningMoments()
    seen: list[float] = []
    for size, loc, scale in [(5, 3.0, 2.0), (1, -4.0, 1.0), (17, 0.5, 0.1), (8, 10.0, 5.0), (2, 0.0, 1.0)]:
        batch = rng.normal(loc, scale, size)
        batch_mean, batch_std = running.update(torch.tensor(batch, dtype=torch.float32))
        batch = batch.astype(np.float32).astype(np.float64)  # what the tensor held
        seen.extend(batch.tolist())
        assert batch_mean == pytest.approx(batch.mean(), rel=1e-12, abs=1e-12)
        assert batch_std == pytest.approx(batch.std(ddof=1) if size > 1 else 0.0, rel=1e-12, abs=1e-12)
        assert running.mean == pytest.approx(np.mean(seen), rel=1e-12, abs=1e-12)
        assert running.var == pytest.approx(np.var(seen), rel=1e-10)
        assert running.std == pytest.approx(np.std(seen, ddof=1), rel=1e-10)
        assert running.count == pytest.approx(len(seen))


def test_hand_computed_two_batches():
    running = RunningMoments()
    assert running.update(torch.tensor([1.0, 3.0])) == pytest.approx((2.0, 2**0.5))
    assert (running.mean, running.var) == pytest.approx((2.0, 1.0))
    assert running.std == pytest.approx(2**0.5)
    running.update(torch.tensor([[5.0], [7.0]]))  # any shape: all elements count
    # all values 1, 3, 5, 7: mean 4, population var 5, sample std sqrt(20/3)
    assert (running.mean, running.var, running.std) == pytest.approx((4.0, 5.0, (20 / 3) ** 0.5))


def test_single_value_keeps_prior_std_until_two_values_are_seen():
    running = RunningMoments()
    assert running.update(torch.tensor([5.0])) == (5.0, 0.0)
    assert running.mean == pytest.approx(5.0)
    assert running.std == 1.0
    running.update(torch.tensor([7.0]))
    assert running.mean == pytest.approx(6.0)
    assert running.std == pytest.approx(np.std([5.0, 7.0], ddof=1))


def test_rejects_empty_and_non_finite_batches():
    running = RunningMoments()
    with pytest.raises(ValueError, match="empty"):
        running.update(torch.zeros(0))
    with pytest.raises(ValueError, match="non-finite"):
        running.update(torch.tensor([1.0, float("nan")]))
    assert running.state_dict() == RunningMoments().state_dict()


def test_state_dict_round_trip_through_json_and_torch(tmp_path):
    running = RunningMoments()
    running.update(torch.tensor([1.0, 2.0, 4.0]))
    running.update(torch.tensor([-3.0, 0.5]))
    state = running.state_dict()
    assert all(type(value) is float for value in state.values())

    from_json = RunningMoments()
    from_json.load_state_dict(json.loads(json.dumps(state)))
    path = tmp_path / "moments.pt"
    torch.save(state, path)
    from_torch = RunningMoments()
    from_torch.load_state_dict(torch.load(path, weights_only=True))
    running.update(torch.tensor([9.0, 8.0]))
    for restored in (from_json, from_torch):
        assert restored.mean == state["mean"] and restored.count == state["count"]
        # Continuing from the restored state is exact.
        restored.update(torch.tensor([9.0, 8.0]))
        assert restored.state_dict() == running.state_dict()
    with pytest.raises(ValueError, match="count"):
        RunningMoments().load_state_dict({"mean": 0.0, "var": 1.0, "std": 1.0})
