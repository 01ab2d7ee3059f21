"""What each process of the 2-process launch in :mod:`tests.distributed.test_guard_fsdp2` runs: the
divergence guard (:mod:`rlhf_cli.ppo.guard`) on an FSDP2-sharded tiny GPT-2. Its gradient norm is a plain
tensor equal to the unsharded model's norm of the same global batch (clipped or not), and a NaN loss on
rank 1 only makes both ranks skip the update. Prints "guard OK" on each rank."""

from __future__ import annotations

import math
import os
import sys

import torch
from accelerate import Accelerator

from rlhf_cli.models import AutoModelForCausalLMWithValueHead
from rlhf_cli.ppo.guard import check_update, gradient_norm
from rlhf_cli.ppo.sharding import shard_model
from tests.tiny import make_tiny_gpt2, make_word_tokenizer


def _backward(model, ids, *, nan: bool = False) -> torch.Tensor:
    for param in model.parameters():
        param.grad = None
    loss = model(input_ids=ids)[0].float().pow(2).mean()
    loss = loss * math.nan if nan else loss
    loss.backward()  # FSDP2 averages over the processes: the global batch's mean of the two halves
    return loss


def main() -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    tokenizer = make_word_tokenizer()
    build = lambda: AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer, seed=0))  # noqa: E731
    ids = torch.randint(3, len(tokenizer), (4, 6), generator=torch.Generator().manual_seed(0))
    whole = build()
    _backward(whole, ids)
    want = float(torch.nn.utils.get_total_norm([p.grad for p in whole.parameters() if p.grad is not None]))
    sharded = shard_model(build(), torch.device("cpu"), "fp32")
    loss = _backward(sharded, ids[rank * 2 : (rank + 1) * 2])
    norm = gradient_norm(accelerator, sharded, None)
    assert not hasattr(norm, "full_tensor"), "the norm must be whole, not a DTensor"
    assert math.isclose(float(norm), want, rel_tol=1e-4), (float(norm), want)
    assert math.isclose(float(gradient_norm(accelerator, sharded, 1e9)), want, rel_tol=1e-4)  # the clipping path
    assert not bool(check_update(accelerator, loss, norm).skipped)
    loss = _backward(sharded, ids[rank * 2 : (rank + 1) * 2], nan=rank == 1)
    verdict = check_update(accelerator, loss, gradient_norm(accelerator, sharded, None))
    assert bool(verdict.skipped), f"rank {rank} would apply an update rank 1 found non-finite"
    print(rank, "guard OK", flush=True)


if __name__ == "__main__":
    main()
    # Both ranks are done and have said so. Under load (about 1 launch in 8 with other jobs on both
    # cores) one rank then aborted during the interpreter's teardown, after its last Python frame
    # ("terminate called without an active exception", exit -6; destroying the process group first did
    # not prevent it): leave without running C++ static destructors, so the launch reports the checks.
    sys.stdout.flush()
    os._exit(0)
