"""Means split over processes (masked_mean/policy_loss/value_loss with a global token count) and the
multi-process helpers of rlhf_cli.ppo.distributed."""

from __future__ import annotations

import pytest
import torch

from rlhf_cli.ppo.distributed import cpu_process_group_needed, own_share
from rlhf_cli.algo.functional import masked_mean, policy_loss, value_loss


def _ragged(seed: int, rows: int = 6, width: int = 5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = torch.arange(width).expand(rows, width) < lengths[:, None]
    tensors = [torch.randn(rows, width, generator=gen, dtype=torch.float64) for _ in range(4)]
    for t in tensors:
        t[~mask] = float("inf")  # padding garbage must not leak
    return mask, tensors


def test_masked_mean_with_count_divides_the_masked_sum_by_it():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(values, mask, count=10.0).item() == pytest.approx(15.0 / 10.0)
    assert masked_mean(values, mask, count=torch.tensor(4.0)).item() == masked_mean(values, mask).item()
    with pytest.raises(ValueError, match="axis=None"):
        masked_mean(values, mask, axis=1, count=4.0)


@pytest.mark.parametrize("seed", range(4))
def test_shares_of_split_rows_add_up_to_the_whole_mean(seed):
    """Rows 0–2 on one process, 3–5 on another, each dividing by the count of all six rows."""
    mask, (values, *_) = _ragged(seed)
    count = mask.sum()
    shares = [masked_mean(values[part], mask[part], count=count) for part in (slice(0, 3), slice(3, 6))]
    expected = sum(values[i, j].item() for i in range(6) for j in range(5) if mask[i, j]) / int(count)
    assert sum(s.item() for s in shares) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_policy_and_value_loss_shares_add_up_to_the_whole_batch_values(seed):
    mask, (logprobs, old_logprobs, advantages, returns) = _ragged(seed)
    logprobs = torch.where(mask, old_logprobs + 0.3 * logprobs.clamp(-3, 3), old_logprobs)
    values, old_values = returns * 0.5, returns * 0.2
    whole_p = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    whole_v = value_loss(values, old_values, returns, mask, 0.2)
    count = mask.sum()
    parts = (slice(0, 2), slice(2, 6))
    share_p = [policy_loss(logprobs[p], old_logprobs[p], advantages[p], mask[p], 0.2, token_count=count) for p in parts]
    share_v = [value_loss(values[p], old_values[p], returns[p], mask[p], 0.2, token_count=count) for p in parts]
    for field in whole_p._fields:
        assert sum(getattr(s, field) for s in share_p).item() == pytest.approx(getattr(whole_p, field).item(), rel=1e-12, abs=1e-15)
    for field in whole_v._fields:
        assert sum(getattr(s, field) for s in share_v).item() == pytest.approx(getattr(whole_v, field).item(), rel=1e-12, abs=1e-15)
    # Gradients too: the shares' gradients add up to the whole loss's gradient.
    leaf = logprobs.clone().requires_grad_(True)
    policy_loss(leaf, old_logprobs, advantages, mask, 0.2).loss.backward()
    whole_grad = leaf.grad.clone()
    leaf.grad = None
    sum(policy_loss(leaf[p], old_logprobs[p], advantages[p], mask[p], 0.2, token_count=count).loss for p in parts).backward()
    torch.testing.assert_close(leaf.grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_own_share_is_the_contiguous_slice_of_each_rank():
    rows = torch.tensor([7, 3, 5, 0, 6, 1])
    assert [own_share(rows, r, 2).tolist() for r in range(2)] == [[7, 3, 5], [0, 6, 1]]
    assert [own_share(rows, r, 3).tolist() for r in range(3)] == [[7, 3], [5, 0], [6, 1]]
    assert torch.equal(own_share(rows, 0, 1), rows)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),  # one plain process
        ({"WORLD_SIZE": "1"}, False),
        ({"WORLD_SIZE": "2"}, True),  # a launch on this CPU-only machine
        ({"ACCELERATE_USE_CPU": "true"}, True),  # accelerate launch --cpu
        ({"ACCELERATE_USE_CPU": "false", "WORLD_SIZE": "2"}, True),
    ],
)
def test_cpu_process_group_needed_on_a_machine_without_gpu(monkeypatch, env, expected):
    for key in ("WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_process_group_needed() is expected


def test_a_launch_on_gpus_is_left_to_accelerate(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_process_group_needed() is False
