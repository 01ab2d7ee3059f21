#!/usr/bin/env python
"""Side-by-side with legacy TRL's PPOTrainer (trl 0.11.4) at identical configuration, interleaved.

Needs the peer's side venv and scripts (``../shared/peer/``: ``setup_trl_legacy.sh``,
``make_assets.py``, ``run_trl_legacy.py``); they are run as they are, never imported.

    bash ../shared/peer/setup_trl_legacy.sh                      # once: /tmp/trl-legacy-venv (~80 s)
    python benchmarks/compare_trl.py --rounds 3 --steps 10 --json compare.json

Each round runs our benchmark (``bench_ppo.py --assets``: same tokenizer, model, prompts and reward)
and then TRL's script, each in a fresh process, so the machine's load drifts over both alike. Both
generate exactly ``--new-tokens`` tokens with ``top_k=0, top_p=1``; a step is generation + scoring +
``step()``; the first step of each run is a warm-up and is not counted. Reports per round and as
medians over rounds: s/step, samples/s, the samples/s ratio (ours / TRL) and peak RSS of both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_PEER = HERE.parent.parent / "shared" / "peer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-python", type=Path, default=Path("/tmp/trl-legacy-venv/bin/python"))
    ap.add_argument("--peer-dir", type=Path, default=DEFAULT_PEER, help="directory with make_assets.py and run_trl_legacy.py")
    ap.add_argument("--assets", type=Path, default=Path("/tmp/peer_assets"), help="made with make_assets.py if missing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run (one more is run as warm-up)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def ensure_assets(args: argparse.Namespace) -> None:
    needed = ((args.trl_python, "TRL venv python (run setup_trl_legacy.sh)"), (args.peer_dir / "run_trl_legacy.py", "peer script"))
    for path, what in needed:
        if not path.exists():
            raise SystemExit(f"{path} does not exist: the {what} is needed.")
    if not (args.assets / "prompts.jsonl").is_file():
        subprocess.run([str(args.trl_python), str(args.peer_dir / "make_assets.py"), str(args.assets)], check=True)


def run_ours(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "ours.json"
    subprocess.run(
        [
            sys.executable, str(HERE / "bench_ppo.py"), "--assets", str(args.assets), "--no-limit",
            "--steps", str(args.steps), "--warmup", "1", "--batch-size", str(args.batch_size),
            "--mini-batch-size", str(args.mini_batch_size), "--epochs", str(args.epochs),
            "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--seed", str(args.seed),
            "--json", str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    result = json.loads(out.read_text())["results"][0]
    return {"median_step_s": result["median_step_s"], "peak_rss_mb": result["peak_rss_mb"], "phases_s": result["phases_s"]}


def run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "trl.json"
    subprocess.run(
        [
            str(args.trl_python), str(args.peer_dir / "run_trl_legacy.py"), "--assets", str(args.assets),
            "--steps", str(args.steps + 1), "--batch-size", str(args.batch_size),
            "--mini-batch-size", str(args.mini_batch_size), "--ppo-epochs", str(args.epochs),
            "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--seed", str(args.seed),
            "--log-every", "0", "--out", str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    data = json.loads(out.read_text())
    steps = data["steps"][1:]  # the first step is the warm-up, as on our side
    return {
        "median_step_s": statistics.median(s["time_s"] for s in steps),
        "peak_rss_mb": data["peak_rss_mb"],
        "phases_s": {
            "generation": statistics.median(s["gen_s"] for s in steps),
            "reward": statistics.median(s["score_s"] for s in steps),
            "no_grad_passes": statistics.median(s["trl_time/ppo/forward_pass"] for s in steps),
            "optimisation": statistics.median(s["trl_time/ppo/optimize_step"] for s in steps),
        },
        "versions": data["versions"],
    }


def _describe(run: dict[str, Any], batch_size: int) -> str:
    return f"{run['median_step_s']:.3f} s/step ({batch_size / run['median_step_s']:.1f} samples/s, {run['peak_rss_mb']:.0f} MB)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_assets(args)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="compare-trl-") as tmp:
        for index in range(args.rounds):
            ours = run_ours(args, Path(tmp))
            trl = run_trl(args, Path(tmp))
            ratio = trl["median_step_s"] / ours["median_step_s"]  # samples/s ours over theirs
            memory = ours["peak_rss_mb"] / trl["peak_rss_mb"]
            rounds.append({"ours": ours, "trl": trl, "samples_per_s_ratio": ratio, "peak_rss_ratio": memory})
            print(f"round {index + 1}: ours {_describe(ours, args.batch_size)} | TRL {_describe(trl, args.batch_size)} | "
                  f"samples/s ours/TRL {ratio:.2f}", flush=True)
    summary = {
        "ours_median_step_s": statistics.median(r["ours"]["median_step_s"] for r in rounds),
        "trl_median_step_s": statistics.median(r["trl"]["median_step_s"] for r in rounds),
        "samples_per_s_ratio": statistics.median(r["samples_per_s_ratio"] for r in rounds),
        "ours_peak_rss_mb": statistics.median(r["ours"]["peak_rss_mb"] for r in rounds),
        "trl_peak_rss_mb": statistics.median(r["trl"]["peak_rss_mb"] for r in rounds),
    }
    summary["peak_rss_ratio"] = summary["ours_peak_rss_mb"] / summary["trl_peak_rss_mb"]
    print(
        f"median over {args.rounds} rounds: samples/s ours/TRL = {summary['samples_per_s_ratio']:.2f} "
        f"(ours {summary['ours_median_step_s']:.3f} s/step, TRL {summary['trl_median_step_s']:.3f} s/step); "
        f"peak RSS ours/TRL = {summary['peak_rss_ratio']:.2f} "
        f"({summary['ours_peak_rss_mb']:.0f} vs {summary['trl_peak_rss_mb']:.0f} MB)"
    )
    if args.json is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "rounds": rounds, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
