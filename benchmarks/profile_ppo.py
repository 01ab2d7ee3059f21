#!/usr/bin/env python
"""Where the engine's step time goes: cProfile or torch.profiler over a few engine steps.

    python benchmarks/profile_ppo.py --model small --steps 2                 # cProfile, top 40 by own time
    python benchmarks/profile_ppo.py --model small --profiler torch --steps 1  # torch ops, top 40 by self CPU time

Same workload and step as bench_ppo.py (one warm-up step first, not profiled); same knobs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_ppo import EngineBench, add_objective_arguments  # noqa: E402  (sets the offline environment variables)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="tiny, small or smollm2 (ignored with --assets)")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF for --model smollm2")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="PPOConfig.precision")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="Accelerate's autocast")
    ap.add_argument("--assets", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--min-new-tokens", type=int, default=None, help="variable lengths, as in bench_ppo.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learning-rate", type=float, default=1.41e-5)
    add_objective_arguments(ap)
    ap.add_argument("--profiler", choices=("cprofile", "torch"), default="cprofile")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative, ...)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--trace", type=Path, default=None, help="torch profiler: also write a Chrome trace here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from workload import build_workload

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bench = EngineBench(build_workload(args.model, args.seed, args.assets, args.gguf), args)
    bench.step()  # warm-up
    if args.profiler == "cprofile":
        profiler = cProfile.Profile()
        profiler.enable()
        records = [bench.step() for _ in range(args.steps)]
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            records = [bench.step() for _ in range(args.steps)]
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        if args.trace is not None:
            prof.export_chrome_trace(str(args.trace))
    for record in records:
        print({key: round(value, 4) for key, value in record.items()})


if __name__ == "__main__":
    main()
