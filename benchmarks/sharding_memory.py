"""DDP vs FSDP2 on the processes of one launch: what each process holds, its peak memory, s/step.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml benchmarks/sharding_memory.py \
        --out fsdp2.json -- ppo.sharding=fsdp2 steps=3
    (the same with ppo.sharding=none for DDP; anything after -- is an `rlhf train` override)

Per process: the bytes of parameters (policy with value head, reference), gradients and optimiser
state it holds between steps (the local shards under FSDP2: exact, from the tensors), its peak
resident memory (``ru_maxrss``: torch, Python and data included), the median seconds per PPO
step after the first (whose rollout was done at construction), and the peak memory during
generation and during training (``phase_peaks``, sampled every 2 ms by a thread, see
:class:`PhasePeaks`; per phase the highest peak over its calls after the first). Rank 0 writes ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import threading
import time
from contextlib import contextmanager

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class PhasePeaks:
    """Peak memory per phase (generation, training), sampled by a thread: torch's CPU allocator keeps
    no peak statistics, and ru_maxrss cannot be reset between phases. Two measures: the bytes malloc
    has handed out and not had back (glibc's mallinfo2: in-use heap plus mmapped blocks; torch's CPU
    tensors are malloc'd and freed at once), which rises and falls with the phase's tensors, and the
    resident memory (/proc/self/statm), which the allocator rarely gives back."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.current, self.calls = interval, None, {}
        self._page = resource.getpagesize()
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MallInfo2
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> dict[str, int]:
        info = self._libc.mallinfo2()
        with open("/proc/self/statm", encoding="ascii") as handle:
            rss = int(handle.read().split()[1]) * self._page
        return {"heap": info.uordblks + info.hblkhd, "rss": rss}

    def _update(self) -> None:
        current, sample = self.current, self.now()
        if current is not None:
            for key, value in sample.items():
                current["peak_" + key] = max(current["peak_" + key], value)

    def _sample(self) -> None:
        while True:
            self._update()
            time.sleep(self.interval)

    @contextmanager
    def phase(self, name: str):
        start = self.now()
        self.current = {**{"start_" + k: v for k, v in start.items()}, **{"peak_" + k: v for k, v in start.items()}}
        try:
            yield
        finally:
            self._update()
            self.calls.setdefault(name, []).append(self.current)
            self.current = None

    def wrap(self, name: str, function):
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return wrapped

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase, over its calls after the first (the first allocates torch's caches), in MB: the
        highest heap peak and its rise above the heap the phase started with, and the highest resident peak."""
        out = {}
        for name, calls in self.calls.items():
            later = calls[1:] or calls
            top = max(later, key=lambda call: call["peak_heap"])
            out[name] = {"peak_heap_mb": top["peak_heap"] / 2**20, "rise_heap_mb": (top["peak_heap"] - top["start_heap"]) / 2**20,
                         "peak_rss_mb": max(call["peak_rss"] for call in later) / 2**20, "calls": len(calls)}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.engine.components import launch_state
    from rlhf_cli.engine.train import TrainingRun

    import rlhf_cli.engine.train as train_module

    state = launch_state()
    cfg = compose_train_config(["eval_prompts=0", "logging.progress=false", "overwrite=true", *args.overrides])
    peaks = PhasePeaks()
    train_module.generate_responses = peaks.wrap("generation", train_module.generate_responses)
    run = TrainingRun(cfg)
    run.trainer.step = peaks.wrap("training", run.trainer.step)  # scoring forwards and the PPO epochs
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
        "phase_peaks": peaks.summary(),
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
