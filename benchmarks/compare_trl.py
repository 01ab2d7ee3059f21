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

``--real-lm`` compares on the issue's real LM instead: SmolLM2-135M-Instruct (the ``smollm2_imdb``
recipe's model, converted once from its GGUF), the recipe's IMDb prompts (the same token ids on both
sides, written to a JSON file first), VADER on the response, B=16, M=8, 4 epochs, 16 new tokens.
Each round runs four configurations interleaved, each in a fresh process: ours fp32, TRL fp32, ours
``precision=bf16`` (bf16 weights, fp32 masters), TRL with ``accelerator_kwargs={"mixed_precision":
"bf16"}``; TRL's side is our ``trl_legacy_real_lm.py`` run in TRL's venv (it needs ``vaderSentiment``
there: ``/tmp/trl-legacy-venv/bin/pip install vadersentiment``). The headline ratio takes each side
at its faster setting.

    python benchmarks/compare_trl.py --real-lm --rounds 2 --steps 3 --json real_lm.json
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
    ap.add_argument("--real-lm", action="store_true", help="SmolLM2-135M, IMDb prompts, VADER, B=16 M=8 (see above)")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF (default: workload.DEFAULT_GGUF)")
    ap.add_argument("--variants", default=",".join(f"{s}_{p}" for s, p in REAL_LM_VARIANTS),
                    help="--real-lm: comma-separated SIDE_PRECISION runs per round, in this order (e.g. ours_fp32,trl_fp32 "
                    "on a CPU without native bfloat16, where both sides' bf16 modes are emulated and far slower)")
    args = ap.parse_args(argv)
    if args.real_lm:
        # The sizes, unless given explicitly.
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, value in (("--batch-size", 16), ("--mini-batch-size", 8), ("--steps", 3)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    return args


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
    return {"median_step_s": result["median_step_s"], "median_step_cpu_s": result["median_step_cpu_s"],
            "peak_rss_mb": result["peak_rss_mb"], "phases_s": result["phases_s"]}


# TRL-side record field -> our phase name (a field a script does not record is left out).
_TRL_PHASES = {
    "generation": "gen_s",
    "reward": "score_s",
    "step": "step_s",
    "no_grad_passes": "trl_time/ppo/forward_pass",
    "optimisation": "trl_time/ppo/optimize_step",
}


def _trl_summary(out: Path) -> dict[str, Any]:
    """Medians of a TRL-side run's JSON record, its warm-up step left out as on our side."""
    data = json.loads(out.read_text())
    steps = data["steps"][1:]
    return {
        "median_step_s": statistics.median(s["time_s"] for s in steps),
        "median_step_cpu_s": statistics.median(s.get("cpu_s", float("nan")) for s in steps),
        "peak_rss_mb": data["peak_rss_mb"],
        "phases_s": {
            phase: statistics.median(s[field] for s in steps) for phase, field in _TRL_PHASES.items() if field in steps[0]
        },
        "versions": data["versions"],
    }


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
    return _trl_summary(out)


# Real LM ----------------------------------------------------------------------------------------
REAL_LM_VARIANTS = (("ours", "fp32"), ("trl", "fp32"), ("ours", "bf16"), ("trl", "bf16"))


def write_real_lm_prompts(args: argparse.Namespace, path: Path) -> Path:
    """The recipe's prompts (text and token ids) as JSON for TRL's side; returns the model directory."""
    sys.path.insert(0, str(HERE))
    import workload

    load = workload.build_workload("smollm2", args.seed, gguf=args.gguf)
    rows = [{"query": q, "input_ids": ids.tolist()} for q, ids in zip(load.prompts, load.query_ids)]
    path.write_text(json.dumps(rows))
    return workload.converted_model_dir(args.gguf)


def run_ours_real_lm(args: argparse.Namespace, workdir: Path, precision: str) -> dict[str, Any]:
    out = workdir / f"ours-{precision}.json"
    command = [
        sys.executable, str(HERE / "bench_ppo.py"), "--real-lm", "--no-limit", "--precision", precision,
        "--steps", str(args.steps), "--warmup", "1", "--batch-size", str(args.batch_size),
        "--mini-batch-size", str(args.mini_batch_size), "--epochs", str(args.epochs), "--new-tokens",
        str(args.new_tokens), "--threads", str(args.threads), "--seed", str(args.seed), "--json", str(out),
    ]
    if args.gguf is not None:
        command += ["--gguf", str(args.gguf)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())["results"][0]
    return {"median_step_s": result["median_step_s"], "median_step_cpu_s": result["median_step_cpu_s"],
            "peak_rss_mb": result["peak_rss_mb"], "phases_s": result["phases_s"]}


def run_trl_real_lm(args: argparse.Namespace, workdir: Path, precision: str, model_dir: Path, prompts: Path) -> dict[str, Any]:
    out = workdir / f"trl-{precision}.json"
    subprocess.run(
        [
            str(args.trl_python), str(HERE / "trl_legacy_real_lm.py"), "--model-dir", str(model_dir),
            "--prompts", str(prompts), "--steps", str(args.steps + 1), "--batch-size", str(args.batch_size),
            "--mini-batch-size", str(args.mini_batch_size), "--ppo-epochs", str(args.epochs),
            "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--seed", str(args.seed),
            "--mixed-precision", "bf16" if precision == "bf16" else "no", "--out", str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _trl_summary(out)


def _variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    chosen = [tuple(v.strip().split("_", 1)) for v in args.variants.split(",") if v.strip()]
    unknown = [f"{side}_{precision}" for side, precision in chosen if (side, precision) not in REAL_LM_VARIANTS]
    if unknown or not any(side == "ours" for side, _ in chosen) or not any(side == "trl" for side, _ in chosen):
        raise SystemExit(f"--variants needs at least one ours_* and one trl_* of {[f'{s}_{p}' for s, p in REAL_LM_VARIANTS]}; got {args.variants!r}.")
    return chosen


def _best(runs: dict[str, dict[str, Any]], side: str, key: str = "median_step_s") -> float:
    """The side's faster setting (by wall time), and its value of ``key``."""
    fastest = min((r for name, r in runs.items() if name.startswith(side + "_")), key=lambda r: r["median_step_s"])
    return fastest[key]


def main_real_lm(args: argparse.Namespace) -> None:
    if not args.trl_python.exists():
        raise SystemExit(f"{args.trl_python} does not exist: the TRL venv python (run setup_trl_legacy.sh) is needed.")
    variants, rounds = _variants(args), []
    with tempfile.TemporaryDirectory(prefix="compare-trl-real-") as tmp:
        prompts = Path(tmp) / "prompts.json"
        model_dir = write_real_lm_prompts(args, prompts)
        for index in range(args.rounds):
            runs = {}
            for side, precision in variants:
                if side == "ours":
                    run = run_ours_real_lm(args, Path(tmp), precision)
                else:
                    run = run_trl_real_lm(args, Path(tmp), precision, model_dir, prompts)
                runs[f"{side}_{precision}"] = run
                print(f"round {index + 1} {side:4s} {precision}: {_describe(run, args.batch_size)} phases "
                      + ", ".join(f"{k} {v:.2f}" for k, v in run["phases_s"].items()), flush=True)
            ratio = _best(runs, "trl") / _best(runs, "ours")
            cpu_ratio = _best(runs, "trl", "median_step_cpu_s") / _best(runs, "ours", "median_step_cpu_s")
            rss_ratio = _best(runs, "ours", "peak_rss_mb") / _best(runs, "trl", "peak_rss_mb")
            rounds.append({"runs": runs, "samples_per_s_ratio": ratio, "cpu_ratio": cpu_ratio, "peak_rss_ratio": rss_ratio})
            print(f"round {index + 1}: samples/s ours (best) / TRL (best) = {ratio:.2f} wall, {cpu_ratio:.2f} CPU; "
                  f"peak RSS ours/TRL = {rss_ratio:.2f}", flush=True)
    summary = _real_lm_summary(rounds, [f"{side}_{precision}" for side, precision in variants])
    print(f"median over {args.rounds} rounds: samples/s ours/TRL (each at its faster setting) = "
          f"{summary['samples_per_s_ratio']:.2f} wall, {summary['cpu_ratio']:.2f} CPU; peak RSS ours/TRL = {summary['peak_rss_ratio']:.2f}")
    for name, s in summary["runs"].items():
        print(f"  {name}: {s['median_step_s']:.2f} s/step (CPU {s['median_step_cpu_s']:.2f} s), peak RSS {s['peak_rss_mb']:.0f} MB, "
              "phases " + ", ".join(f"{k} {v:.2f}" for k, v in s["phases_s"].items()))
    if args.json is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "rounds": rounds, "summary": summary}, indent=1))


def _real_lm_summary(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Medians over rounds of every run's figures and of the per-round ratios."""
    def median(name: str, key: str) -> float:
        return statistics.median(r["runs"][name][key] for r in rounds)

    runs = {
        name: {
            "median_step_s": median(name, "median_step_s"),
            "median_step_cpu_s": median(name, "median_step_cpu_s"),
            "peak_rss_mb": median(name, "peak_rss_mb"),
            "phases_s": {k: statistics.median(r["runs"][name]["phases_s"][k] for r in rounds) for k in rounds[0]["runs"][name]["phases_s"]},
        }
        for name in names
    }
    ratios = {key: statistics.median(r[key] for r in rounds) for key in ("samples_per_s_ratio", "cpu_ratio", "peak_rss_ratio")}
    return {"runs": runs, **ratios}


def _describe(run: dict[str, Any], batch_size: int) -> str:
    cpu = f", CPU {run['median_step_cpu_s']:.3f} s" if "median_step_cpu_s" in run else ""
    return f"{run['median_step_s']:.3f} s/step ({batch_size / run['median_step_s']:.1f} samples/s{cpu}, {run['peak_rss_mb']:.0f} MB)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.real_lm:
        main_real_lm(args)
        return
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
