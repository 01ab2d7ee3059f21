"""Inputs and index tensors reach the model on the model's device, checked on a CPU-only machine.

On a GPU, a batch packed on the host reached the value-head model's embedding on the CPU ("index is
on cpu", 15 tests on an H200). A CPU machine has a second device to catch that with: ``meta``. The
model's weights go there, and a forward pre-hook on the value-head model records the device of every
tensor it gets (token ids, mask, positions, and the ``logits_to_keep`` index the packed forward
builds), then stops the pass (meta tensors cannot run transformers' data-dependent mask checks).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_cli import AutoModelForCausalLMWithValueHead
from rlhf_cli.models.model_facts import keep_positions
from rlhf_cli.ppo.forward import response_outputs, score_rollout
from rlhf_cli.rollout.packing import pack_batch
from tests.tiny import make_tiny_gpt2

QUERIES = [torch.tensor([3, 4, 5]), torch.tensor([6]), torch.tensor([7, 8])]
RAGGED = [torch.tensor([9, 10]), torch.tensor([11, 12, 13, 14]), torch.tensor([15])]  # the packed path
EQUAL = [torch.tensor([9, 10]), torch.tensor([11, 12]), torch.tensor([15, 3])]  # the index path


class _Reached(Exception):
    """The value-head model's forward was reached (its inputs' devices recorded)."""


def _device_asserting_policy(tokenizer) -> tuple[nn.Module, list[dict]]:
    """A value-head tiny GPT-2 on ``meta`` that records its tensor inputs' devices and stops."""
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer)).to("meta")
    seen: list[dict] = []

    def check(module, args, kwargs):
        tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        tensors.update({f"arg{i}": value for i, value in enumerate(args) if isinstance(value, torch.Tensor)})
        seen.append({name: value.device.type for name, value in tensors.items()})
        raise _Reached

    policy.register_forward_pre_hook(check, with_kwargs=True)
    return policy, seen


@pytest.mark.parametrize("responses", [RAGGED, EQUAL], ids=["ragged", "equal"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "chunked_head"])
def test_a_batch_packed_on_the_host_reaches_the_model_on_its_device(word_tokenizer, responses, logits):
    policy, seen = _device_asserting_policy(word_tokenizer)
    batch = pack_batch(QUERIES, responses, pad_token_id=0, is_encoder_decoder=False)  # on the CPU
    with pytest.raises(_Reached):
        response_outputs(policy, batch, logits=logits)
    assert "logits_to_keep" in seen[0] and "input_ids" in seen[0]
    assert set(seen[0].values()) == {"meta"}, seen[0]


def test_scoring_a_rollout_packed_on_the_host_runs_the_policy_on_its_device(word_tokenizer):
    policy, seen = _device_asserting_policy(word_tokenizer)
    batch = pack_batch(QUERIES, RAGGED, pad_token_id=0, is_encoder_decoder=False)
    with pytest.raises(_Reached):
        score_rollout(policy, policy, batch, chunk_size=2, need_full_kl=False)
    assert set(seen[0].values()) == {"meta"}, seen[0]


@pytest.mark.parametrize("index", [torch.tensor([1, 3]), torch.tensor([[0, 2], [1, 3]])], ids=["positions", "per_row"])
def test_positions_given_on_the_host_select_from_a_tensor_on_another_device(index):
    """keep_positions (the value head's and the logits' selection) takes an index made on the host;
    a gather with a CPU index on another device fails (take_along_dim checks even against meta).
    (A boolean mask on the host is accepted by PyTorch's indexing on any device.)"""
    on_host = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    kept = keep_positions(on_host.to("meta"), index)
    assert kept.device.type == "meta" and kept.shape == keep_positions(on_host, index).shape
