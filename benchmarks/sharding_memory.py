"""DDP vs FSDP2 on the processes of one launch: what each process holds, its peak memory, s/step.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml benchmarks/sharding_memory.py \
        --out fsdp2.json -- ppo.sharding=fsdp2 steps=3
    (the same with ppo.sharding=none for DDP; anything after -- is an `rlhf train` override)

Per process: the bytes of parameters (policy with value head, reference), gradients and optimiser
state it holds between steps (the local shards under FSDP2: exact, from the tensors), its peak
resident memory (``ru_maxrss``: torch, Python and data included), and the median seconds per PPO
step after the first (whose rollout was done at construction). Rank 0 writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def _local_bytes(tensors) -> int:
    """Bytes held by this process: a DTensor's local shard, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    total, seen = 0, set()
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def held_bytes(trainer) -> dict[str, int]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = [m for _, m in getattr(inner, "pairs", [])]  # precision=bf16 without sharding
    reference = trainer.ref_model
    return {
        "policy_params": _local_bytes(model.parameters()),
        "grads": _local_bytes(p.grad for p in model.parameters()),
        "optimizer_state": _local_bytes(states + masters),
        "reference_params": _local_bytes(reference.parameters()) if reference is not None else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.engine.components import launch_state
    from rlhf_cli.engine.train import TrainingRun

    state = launch_state()
    cfg = compose_train_config(["eval_prompts=0", "logging.progress=false", "overwrite=true", *args.overrides])
    run = TrainingRun(cfg)
    seconds = []
    for _ in range(run.steps):
        start = time.perf_counter()
        run.train_step()
        seconds.append(time.perf_counter() - start)
    trainer = run.trainer
    row = {
        "rank": state.process_index, "processes": state.num_processes, "sharded": trainer.sharded,
        "held_bytes": held_bytes(trainer), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "s_per_step": statistics.median(seconds[1:] or seconds), "steps": len(seconds),
    }
    rows = [None] * state.num_processes
    torch.distributed.all_gather_object(rows, row) if state.num_processes > 1 else rows.__setitem__(0, row)
    if state.is_main_process:
        text = json.dumps({"overrides": args.overrides, "model": cfg.model.source, "ranks": rows}, indent=2)
        print(text)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
