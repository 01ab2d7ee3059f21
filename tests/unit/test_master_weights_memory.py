"""precision=bf16 keeps the model's own float32 tensors as the masters: no second float32 copy of the
model exists while it is cast (that copy set the process's peak memory above legacy TRL's)."""

from __future__ import annotations

import torch
from torch import nn

from rlhf_cli.ppo.precision import with_master_weights


def test_masters_are_the_float32_weights_themselves_and_steps_still_round_into_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    before = {id(p): (p.data_ptr(), p.detach().clone()) for p in model.parameters()}
    optimizer = with_master_weights(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for weight, master in optimizer.pairs:
        pointer, values = before[id(weight)]
        assert master.data_ptr() == pointer and master.dtype == torch.float32  # the same storage: no copy
        assert torch.equal(master, values) and weight.dtype == torch.bfloat16
    model(torch.ones(3, 8, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    for weight, master in optimizer.pairs:
        assert torch.equal(weight, master.to(torch.bfloat16))  # rounded copy of the stepped master
        assert not torch.equal(master, before[id(weight)][1])
