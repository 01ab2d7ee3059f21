#!/usr/bin/env python
"""PPO throughput benchmark: the real engine step, its phases, peak memory and the machine's limit.

Each measured step makes the calls the ``rlhf train`` loop makes (rlhf_cli/engine/train.py):
``generate_responses`` (batched, KV cache) + decode, ``score_responses`` with the reward, then
``PPOTrainer.step``. Every configuration runs in its own subprocess, so peak RSS is its own.

    python benchmarks/bench_ppo.py                              # tiny and small, B=64 M=16 4 epochs 16 tokens
    python benchmarks/bench_ppo.py --model small --steps 5 --json small.json
    python benchmarks/bench_ppo.py --assets /tmp/peer_assets    # the peer's model, prompts and reward
    python benchmarks/bench_ppo.py --scaling                    # batch 16..128 x response 8..64 table
    python benchmarks/bench_ppo.py --offline-default --compare gae:1,grpo:4 --rounds 5   # estimators, interleaved

See benchmarks/README.md for what each number means and the measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                      ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    os.environ.setdefault(_name, _value)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # workload.py and limit.py sit beside this script
RESULT_PREFIX = "BENCH_RESULT "  # the line a child prints its JSON result on
PHASES = ("generation", "reward", "no_grad_passes", "optimisation", "other")
SCALING_BATCHES = (16, 32, 64, 128)
SCALING_LENGTHS = (8, 16, 32, 64)
ESTIMATOR_KNOBS = ("estimator", "samples_per_prompt", "kl_loss_coef", "kl_in_reward")


def add_objective_arguments(ap: argparse.ArgumentParser) -> None:
    """The advantage estimator, its group sampling and the KL terms (shared with profile_ppo.py)."""
    from rlhf_cli.algo.names import ADVANTAGE_ESTIMATORS  # torch-free

    ap.add_argument("--estimator", default="gae", choices=ADVANTAGE_ESTIMATORS, help="PPOConfig.advantage_estimator")
    ap.add_argument("--samples-per-prompt", type=int, default=1,
                    help="responses per prompt (G), generated in the same generate call: each step takes "
                         "batch-size / G prompts, so the number of responses per step stays --batch-size")
    ap.add_argument("--kl-loss-coef", type=float, default=0.0, help="PPOConfig.kl_loss_coef (k3 estimator)")
    ap.add_argument("--kl-in-reward", default="true", choices=("true", "false"), help="PPOConfig.kl_in_reward")
    ap.add_argument("--init-kl-coef", type=float, default=None, help="PPOConfig.init_kl_coef; default: PPOConfig's")


def check_group_size(ap: argparse.ArgumentParser, batch_size: int, estimator: str, group: int) -> None:
    """Refuse an arm PPOConfig would refuse in its child, before any child starts: a batch that is not
    whole groups, or a group too small for the estimator."""
    from rlhf_cli.algo.names import ADVANTAGE_ESTIMATORS, estimator_named

    if estimator not in ADVANTAGE_ESTIMATORS:
        ap.error(f"unknown estimator {estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}.")
    if group < 1 or batch_size % group != 0:
        ap.error(f"the batch size {batch_size} must be a multiple of the responses per prompt {group} "
                 "(the batch counts responses: prompts x responses per prompt).")
    if group < estimator_named(estimator).min_group_size:
        ap.error(f"{estimator} compares the responses of a prompt with each other and needs at least "
                 f"{estimator_named(estimator).min_group_size} per prompt, got {group}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny,small",
                    help="comma-separated: tiny, small (built from config), smollm2 (the smollm2_imdb recipe's real LM; "
                         "ignored with --assets)")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF file for --model smollm2 (default: workload.DEFAULT_GGUF)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="PPOConfig.precision: fp32, or bf16 weights with fp32 master weights")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                    help="Accelerate's autocast (accelerator_kwargs mixed_precision), with --precision fp32")
    ap.add_argument("--real-lm", action="store_true",
                    help="the issue's real-LM configuration: --model smollm2, B=16, M=8, 4 epochs, 16 new tokens")
    ap.add_argument("--offline-default", action="store_true",
                    help="a bare `rlhf train`'s configuration: --model review, B=32, M=16, 2 epochs, lr 3e-4, "
                         "initial KL coefficient 0.1, 8-12 new tokens")
    ap.add_argument("--assets", type=Path, default=None, help="peer assets directory (make_assets.py): its model, prompts, reward")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs per step")
    ap.add_argument("--new-tokens", type=int, default=16, help="exactly this many new tokens per response")
    ap.add_argument("--min-new-tokens", type=int, default=None,
                    help="if set, each response's length is drawn uniformly from [this, --new-tokens] (like the "
                         "engine's response_min_tokens..response_max_tokens); default: all exactly --new-tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    ap.add_argument("--steps", type=int, default=10, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="steps run first and not counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learning-rate", type=float, default=1.41e-5)
    ap.add_argument("--no-limit", action="store_true", help="skip the plain-torch limit measurement")
    ap.add_argument("--limit-repeats", type=int, default=3)
    ap.add_argument("--scaling", action="store_true",
                    help="table over batch sizes 16/32/64/128 x response lengths 8/16/32/64")
    ap.add_argument("--scaling-batches", default=",".join(map(str, SCALING_BATCHES)))
    ap.add_argument("--scaling-lengths", default=",".join(map(str, SCALING_LENGTHS)))
    add_objective_arguments(ap)
    ap.add_argument("--compare", default=None, metavar="EST:G,EST:G",
                    help="interleave these estimator:samples-per-prompt arms (e.g. gae:1,grpo:4) for --rounds rounds, "
                         "one child per arm and round, and report ratios to the first arm")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    ap.add_argument("--heldout", type=int, default=0, metavar="N",
                    help="after the steps, the mean reward on the first N held-out prompts before (the reference) and "
                         "after training, as `rlhf train` evaluates them (--model review or smollm2 only)")
    ap.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    apply_presets(args)
    try:
        arms = parse_arms(args.compare) if args.compare is not None else [(args.estimator, args.samples_per_prompt)]
    except ValueError as error:
        ap.error(str(error))
    for estimator, group in arms:
        check_group_size(ap, args.batch_size, estimator, group)
    if args.heldout:
        from workload import CONFIG_MODELS  # imports torch: only when asked

        if args.assets is not None or args.model not in CONFIG_MODELS:
            ap.error(f"--heldout needs held-out prompts: --model {' or '.join(CONFIG_MODELS)} (one model, no --assets).")
    return args


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """This process's resident set size now (Linux: /proc/self/statm counts pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# One configuration (runs in the child process) ---------------------------------------------------


class EngineBench:
    """The engine's training step (rlhf_cli/engine/train.py, stages 2-4) on a workload."""

    def __init__(self, workload, args: argparse.Namespace) -> None:
        import numpy as np

        from rlhf_cli import PPOConfig, PPOTrainer
        from rlhf_cli.seeding import set_seed

        self.workload, self.args = workload, args
        config = PPOConfig(
            seed=args.seed,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.epochs,
            advantage_estimator=args.estimator,
            samples_per_prompt=args.samples_per_prompt,
            kl_loss_coef=args.kl_loss_coef,
            kl_in_reward=args.kl_in_reward == "true",
            **({} if args.init_kl_coef is None else {"init_kl_coef": args.init_kl_coef}),
            precision=args.precision,
            accelerator_kwargs={"mixed_precision": args.mixed_precision} if args.mixed_precision != "no" else {},
        )
        self.trainer = PPOTrainer(config, workload.policy, tokenizer=workload.tokenizer)
        # What the engine's generation_settings gives for the sampling (top_k=0, top_p=1,
        # the whole batch in one generate call).
        self.generation = dict(
            pad_token_id=self.trainer.pad_token_id,
            eos_token_id=self.trainer.eos_token_id,
            is_encoder_decoder=self.trainer.is_encoder_decoder,
            batch_size=None,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
        )
        self.prompt_rng = np.random.default_rng(args.seed)
        self.length_rng = np.random.default_rng([args.seed, 1])
        set_seed(args.seed)
        self.last_batch: tuple[list, list] = ([], [])

    def _budgets(self) -> list[int]:
        args = self.args
        if args.min_new_tokens is None or args.min_new_tokens >= args.new_tokens:
            return [args.new_tokens] * args.batch_size
        return self.length_rng.integers(args.min_new_tokens, args.new_tokens + 1, size=args.batch_size).tolist()

    def step(self) -> dict[str, float]:
        """One step on a fresh batch of prompts; returns its timings (seconds) and a few stats."""
        from rlhf_cli.rewards import score_responses
        from rlhf_cli.rollout.generation import generate_responses

        args, workload, trainer = self.args, self.workload, self.trainer
        accelerator = trainer.accelerator
        group = args.samples_per_prompt
        rows = self.prompt_rng.choice(len(workload.prompts), size=args.batch_size // group, replace=False)
        # Prompt-major, as PPOTrainer.step takes groups: each prompt's G responses side by side, all in one generate call.
        queries = [workload.query_ids[i] for i in rows for _ in range(group)]
        prompts = [workload.prompts[i] for i in rows for _ in range(group)]
        budgets = self._budgets()
        start, cpu_start = time.perf_counter(), time.process_time()
        responses = generate_responses(
            accelerator.unwrap_model(trainer.model),
            queries,
            max_new_tokens=budgets,
            device=accelerator.device,
            # EOS is masked until the longest budget: every response is exactly its budget long.
            min_new_tokens=max(budgets),
            **self.generation,
        )
        texts = workload.tokenizer.batch_decode(responses, skip_special_tokens=True)
        generated = time.perf_counter()
        scores = score_responses(workload.reward_fn, prompts, texts)
        scored = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        stepped, cpu_stepped = time.perf_counter(), time.process_time()
        self.last_batch = (queries, responses)
        forward, optimise = stats["time/ppo/forward_pass"], stats["time/ppo/optimize_step"]
        step = stepped - start
        return {
            "step_s": step,
            "cpu_s": cpu_stepped - cpu_start,  # this process's CPU time: less sensitive to other load
            "generation": generated - start,
            "reward": scored - generated,
            "no_grad_passes": forward,
            "optimisation": optimise,
            "other": step - (generated - start) - (scored - generated) - forward - optimise,
            "prompts": float(len(rows)),
            "new_tokens": float(sum(len(r) for r in responses)),
            "reward_mean": float(scores.mean()),
            "kl": float(stats["objective/kl"]),
        }


def heldout_rewards(bench: EngineBench, rows: int) -> dict[str, float]:
    """Mean reward (± standard error) on the first ``rows`` held-out prompts of the reference (the
    policy before training) and of the trained policy, with the engine's evaluation path and seed; the
    gain's standard error is paired (same prompts, same sampling seed)."""
    from rlhf_cli.engine.heldout import compare_on_heldout, model_generation_settings
    from rlhf_cli.summary_stats import standard_error

    workload, trainer = bench.workload, bench.trainer
    policy = trainer.accelerator.unwrap_model(trainer.model)
    comparison = compare_on_heldout(
        workload.run_config, workload.heldout, rows,
        before_model=trainer.ref_model, after_model=policy, tokenizer=workload.tokenizer, reward_fn=workload.reward_fn,
        generation=model_generation_settings(workload.run_config, workload.tokenizer, policy), device=trainer.accelerator.device,
    )
    gains = [a - b for a, b in zip(comparison.after_rewards, comparison.before_rewards)]
    return {
        "prompts": float(rows),
        "before": comparison.mean_before, "before_se": comparison.se_before,
        "after": comparison.mean_after, "after_se": comparison.se_after,
        "gain": statistics.fmean(gains), "gain_se": standard_error(gains),
    }


def summarise(records: list[dict[str, float]], batch_size: int) -> dict[str, Any]:
    median_step = statistics.median(r["step_s"] for r in records)
    tokens = statistics.median(r["new_tokens"] for r in records)
    return {
        "median_step_s": median_step,
        "median_step_cpu_s": statistics.median(r["cpu_s"] for r in records),
        "samples_per_s": batch_size / median_step,
        "generated_tokens_per_s": tokens / median_step,
        "phases_s": {phase: statistics.median(r[phase] for r in records) for phase in PHASES},
        "steps": records,
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Build the workload, run the engine, then (optionally) the limit; all in this process."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from workload import build_workload

    workload = build_workload(args.model, args.seed, args.assets, args.gguf)
    setup_rss = current_rss_mb()  # libraries, model, prompts and reward loaded; no trainer yet
    bench = EngineBench(workload, args)
    for _ in range(args.warmup):
        bench.step()
    records = [bench.step() for _ in range(args.steps)]
    result: dict[str, Any] = {
        "config": {
            **workload.describe(),
            "batch_size": args.batch_size,
            "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "init_kl_coef": bench.trainer.config.init_kl_coef,
            **{knob: getattr(args, knob) for knob in ESTIMATOR_KNOBS},
            "new_tokens": args.new_tokens,
            "min_new_tokens": args.min_new_tokens,
            "threads": torch.get_num_threads(),
            "precision": args.precision,
            "mixed_precision": args.mixed_precision,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        **summarise(records, args.batch_size),
        # Before the limit: its weight copies and optimiser would count otherwise.
        "peak_rss_mb": peak_rss_mb(),
        "setup_rss_mb": setup_rss,
    }
    if args.heldout:
        result["heldout"] = heldout_rewards(bench, args.heldout)
        result["heldout"]["samples_trained"] = (args.warmup + args.steps) * args.batch_size
    if not args.no_limit:
        from limit import measure_limit

        trainer = bench.trainer
        queries, responses = bench.last_batch
        limit = measure_limit(
            trainer.accelerator.unwrap_model(trainer.model),
            trainer.ref_model.pretrained_model,
            queries,
            responses,
            pad_token_id=trainer.pad_token_id,
            new_tokens=args.new_tokens,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.epochs,
            learning_rate=args.learning_rate,
            repeats=args.limit_repeats,
            precision="autocast" if args.mixed_precision == "bf16" else args.precision,
        )
        result["limit"] = limit
        result["limit_ratio"] = result["median_step_s"] / limit["sum_s"]
        result["limit_ratio_without_reward"] = (result["median_step_s"] - result["phases_s"]["reward"]) / limit["sum_s"]
        result["limit_ratio_cpu"] = result["median_step_cpu_s"] / limit["sum_cpu_s"]
    return result


# Driving children and printing -------------------------------------------------------------------


def child_argv(args: argparse.Namespace, **overrides: Any) -> list[str]:
    """The command line of a child running one configuration of ``args`` with ``overrides``."""
    values = {
        "model": args.model, "batch-size": args.batch_size, "mini-batch-size": args.mini_batch_size,
        "epochs": args.epochs, "new-tokens": args.new_tokens, "threads": args.threads, "steps": args.steps,
        "warmup": args.warmup, "seed": args.seed, "learning-rate": args.learning_rate,
        "limit-repeats": args.limit_repeats, "precision": args.precision, "mixed-precision": args.mixed_precision,
        "heldout": args.heldout,
        **({} if args.init_kl_coef is None else {"init-kl-coef": args.init_kl_coef}),
        **{knob.replace("_", "-"): getattr(args, knob) for knob in ESTIMATOR_KNOBS},
    }
    if args.min_new_tokens is not None:
        values["min-new-tokens"] = args.min_new_tokens
    values.update({key.replace("_", "-"): value for key, value in overrides.items()})
    argv = [sys.executable, str(Path(__file__).resolve()), "--child"]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    if args.assets is not None:
        argv += ["--assets", str(args.assets)]
    if args.gguf is not None:
        argv += ["--gguf", str(args.gguf)]
    if args.no_limit:
        argv.append("--no-limit")
    return argv


def spawn(argv: list[str]) -> dict[str, Any]:
    """Run a child and return the result it printed; its stderr passes through."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=HERE)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"benchmark child failed (exit {proc.returncode}): {' '.join(argv)}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def format_result(result: dict[str, Any]) -> str:
    c = result["config"]
    r = result
    lines = [
        f"== {c['model']} ({c['precision']}, mixed_precision={c['mixed_precision']}): {c['n_layer']} layers x {c['n_embd']}, vocab {c['vocab_size']}, "
        f"{c['parameters'] / 1e6:.2f}M params; B={c['batch_size']} M={c['mini_batch_size']} epochs={c['ppo_epochs']} "
        f"new_tokens={c['new_tokens']} threads={c['threads']}; {c['estimator']}, G={c['samples_per_prompt']} responses "
        f"per prompt; {c['steps']} steps (+{c['warmup']} warm-up), "
        f"reward {c['reward']}",
        f"   median step {r['median_step_s']:.3f} s | {r['samples_per_s']:.1f} samples/s | "
        f"{r['generated_tokens_per_s']:.0f} generated tokens/s | CPU {r['median_step_cpu_s']:.3f} s/step | "
        f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['setup_rss_mb']:.0f} MB before the trainer)",
    ]
    for phase in PHASES:
        seconds = result["phases_s"][phase]
        lines.append(f"   {phase:<15} {seconds:8.3f} s  {100 * seconds / result['median_step_s']:5.1f} %")
    if "heldout" in result:
        h = result["heldout"]
        lines.append(
            f"   held-out reward ({h['prompts']:.0f} prompts, after {h['samples_trained']} samples): {h['before']:.3f} +- "
            f"{h['before_se']:.3f} -> {h['after']:.3f} +- {h['after_se']:.3f} (gain {h['gain']:+.3f} +- {h['gain_se']:.3f})"
        )
    if "limit" in result:
        lim = result["limit"]
        lines.append(
            f"   limit (plain torch): generation {lim['generation_s']:.3f} + reference forward {lim['reference_forward_s']:.3f} "
            f"+ {c['ppo_epochs']} epochs fwd/bwd/step {lim['optimisation_s']:.3f} = {lim['sum_s']:.3f} s -> "
            f"engine/limit {result['limit_ratio']:.2f} ({result['limit_ratio_without_reward']:.2f} without the reward; "
            f"{result['limit_ratio_cpu']:.2f} in CPU time)"
        )
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = ["assets"] if args.assets is not None else [m.strip() for m in args.model.split(",") if m.strip()]
    results = []
    for model in models:
        result = spawn(child_argv(args, model=model))
        print(format_result(result), flush=True)
        results.append(result)
    return results


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Step time and peak RSS over batch sizes x response lengths, one subprocess per cell."""
    batches = [int(b) for b in args.scaling_batches.split(",")]
    lengths = [int(n) for n in args.scaling_lengths.split(",")]
    model = "assets" if args.assets is not None else args.model.split(",")[0]
    results = []
    for batch in batches:
        for length in lengths:
            mini = min(args.mini_batch_size, batch)
            argv = child_argv(args, model=model, batch_size=batch, mini_batch_size=mini, new_tokens=length)
            result = spawn(argv + ["--no-limit"])
            results.append(result)
            print(
                f"B={batch:4d} new_tokens={length:3d}: step {result['median_step_s']:.3f} s "
                f"(CPU {result['median_step_cpu_s']:.3f} s), "
                f"{1e3 * result['median_step_s'] / (batch * length):.3f} ms per generated token, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    print(scaling_table(results, batches, lengths))
    return results


def scaling_table(results: list[dict[str, Any]], batches: list[int], lengths: list[int]) -> str:
    cell = {(r["config"]["batch_size"], r["config"]["new_tokens"]): r for r in results}
    header = "| batch \\ new tokens | " + " | ".join(str(n) for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    rows = [header, rule]
    for batch in batches:
        cells = [cell[(batch, n)] for n in lengths]
        values = [f"{r['median_step_s']:.2f} s ({r['median_step_cpu_s']:.2f}) / {r['peak_rss_mb']:.0f} MB" for r in cells]
        rows.append(f"| {batch} | " + " | ".join(values) + " |")
    return "median step time (median CPU time) / peak RSS\n" + "\n".join(rows)


def parse_arms(text: str) -> list[tuple[str, int]]:
    """``"gae:1,grpo:4"`` -> [("gae", 1), ("grpo", 4)] (an arm without ``:G`` takes G = 1)."""
    arms = []
    for item in text.split(","):
        name, _, group = item.strip().partition(":")
        if group and not group.isdigit():
            raise ValueError(f"--compare arm {item.strip()!r}: the responses per prompt after ':' must be a whole number, e.g. grpo:4.")
        arms.append((name, int(group or 1)))
    return arms


def run_estimators(args: argparse.Namespace) -> dict[str, Any]:
    """The arms of ``--compare`` in one sitting: each round runs every arm once, in alternating order
    (so drifting load favours none), one child each; ratios are taken within a round."""
    arms = parse_arms(args.compare)
    rounds = []
    for index in range(args.rounds):
        order = arms if index % 2 == 0 else arms[::-1]
        runs = {}
        for name, group in order:
            argv = child_argv(args, estimator=name, samples_per_prompt=group)
            result = spawn(argv if args.no_limit else argv + ["--no-limit"])
            runs[arm_label(name, group)] = result
            print(f"round {index + 1}: {format_result(result)}", flush=True)
        rounds.append(runs)
    summary = compare_summary(rounds, [arm_label(*arm) for arm in arms])
    print(compare_table(summary))
    return {"rounds": rounds, "summary": summary}


def arm_label(name: str, group: int) -> str:
    return f"{name} G={group}"


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return mean, se


def compare_summary(rounds: list[dict[str, dict[str, Any]]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per arm: medians over the rounds of each round's median step, phases and peak RSS, and the
    ratios of its step time and peak RSS to the first arm's in the same round (median; mean +- SE)."""
    base = labels[0]
    summary = {}
    for label in labels:
        runs = [r[label] for r in rounds]
        step_ratios = [r[label]["median_step_s"] / r[base]["median_step_s"] for r in rounds]
        rss_ratios = [r[label]["peak_rss_mb"] / r[base]["peak_rss_mb"] for r in rounds]
        summary[label] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in runs),
            "median_step_cpu_s": statistics.median(r["median_step_cpu_s"] for r in runs),
            "phases_s": {phase: statistics.median(r["phases_s"][phase] for r in runs) for phase in PHASES},
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "step_ratio": statistics.median(step_ratios),
            "step_ratio_mean_se": _mean_and_se(step_ratios),
            "rss_ratio": statistics.median(rss_ratios),
            "rounds": len(runs),
        }
        if "heldout" in runs[0]:  # the same seed in every round: the same training, the same gain
            summary[label]["heldout_gain"] = statistics.median(r["heldout"]["gain"] for r in runs)
    return summary


def compare_table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of :func:`compare_summary` (ratios to the first arm)."""
    header = "| arm | s/step | CPU s/step | generation | no-grad passes | optimisation | peak RSS | step / first (mean +- SE) | RSS / first |"
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        phases = s["phases_s"]
        mean, se = s["step_ratio_mean_se"]
        rows.append(
            f"| {label} | {s['median_step_s']:.3f} | {s['median_step_cpu_s']:.3f} | {phases['generation']:.3f} | "
            f"{phases['no_grad_passes']:.3f} | {phases['optimisation']:.3f} | {s['peak_rss_mb']:.0f} MB | "
            f"{s['step_ratio']:.3f} ({mean:.3f} +- {se:.3f}) | {s['rss_ratio']:.3f} |"
        )
    return f"medians over {next(iter(summary.values()))['rounds']} interleaved rounds\n" + "\n".join(rows)


def apply_presets(args: argparse.Namespace) -> None:
    """Sizes of the named configurations (they override the size options)."""
    if args.real_lm:  # the sizes for the real LM; --new-tokens (default 16) is kept: issue 23 also runs 128
        args.model, args.batch_size, args.mini_batch_size, args.epochs = "smollm2", 16, 8, 4
    if args.offline_default:  # configs/train.yaml's offline default block
        args.model, args.batch_size, args.mini_batch_size, args.epochs = "review", 32, 16, 2
        args.learning_rate, args.init_kl_coef, args.min_new_tokens, args.new_tokens = 3e-4, 0.1, 8, 12


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        result = run_one(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    if args.compare is not None:
        output = {"mode": "estimators", **run_estimators(args)}
    else:
        output = {"mode": "scaling" if args.scaling else "models", "results": run_scaling(args) if args.scaling else run_models(args)}
    if args.json is not None:
        args.json.write_text(json.dumps(output, indent=1))


if __name__ == "__main__":
    main()
