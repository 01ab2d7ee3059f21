"""The benchmark scripts, run in a reduced form so they cannot rot (speed is never asserted here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PHASES = ("generation", "reward", "no_grad_passes", "optimisation", "other")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_ppo.py"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reduced_tiny_run_reports_every_number(tmp_path, precision):
    """One tiny configuration, two measured steps, in fp32 and in bf16 (bf16 weights, fp32 masters; the
    limit in the same precision): the printout and the JSON carry every field, and the numbers are
    consistent with each other (phases add up, fixed lengths, ratios)."""
    out = tmp_path / "bench.json"
    proc = _run(
        "--model", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--mini-batch-size", "4",
        "--epochs", "1", "--new-tokens", "4", "--limit-repeats", "1", "--precision", precision, "--json", str(out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for text in ("median step", "samples/s", "generated tokens/s", "peak RSS", "limit (plain torch)", "engine/limit", *PHASES):
        assert text in proc.stdout, (text, proc.stdout)

    data = json.loads(out.read_text())
    assert data["mode"] == "models"
    [result] = data["results"]
    config = result["config"]
    assert (config["model"], config["n_layer"], config["n_embd"], config["vocab_size"]) == ("tiny", 2, 128, 546)
    assert (config["batch_size"], config["mini_batch_size"], config["ppo_epochs"], config["new_tokens"]) == (8, 4, 1, 4)
    assert config["threads"] == 1 and config["steps"] == 2 and config["warmup"] == 1
    assert config["precision"] == precision and f"({precision}, mixed_precision=no)" in proc.stdout

    steps = result["steps"]
    assert len(steps) == 2
    for record in steps:
        assert record["new_tokens"] == 8 * 4  # exactly new_tokens per response: min_new_tokens = max_new_tokens
        assert sum(record[phase] for phase in PHASES) == pytest.approx(record["step_s"], rel=1e-9)
        assert all(record[phase] >= 0 for phase in PHASES if phase != "other")
    median = sorted(r["step_s"] for r in steps)
    assert result["median_step_s"] == pytest.approx((median[0] + median[1]) / 2)
    assert result["samples_per_s"] == pytest.approx(8 / result["median_step_s"])
    assert result["generated_tokens_per_s"] == pytest.approx(32 / result["median_step_s"])
    assert set(result["phases_s"]) == set(PHASES)
    assert result["peak_rss_mb"] > 0

    limit = result["limit"]
    assert limit["sum_s"] == pytest.approx(limit["generation_s"] + limit["reference_forward_s"] + limit["optimisation_s"])
    assert result["limit_ratio"] == pytest.approx(result["median_step_s"] / limit["sum_s"])
    assert result["limit_ratio_cpu"] == pytest.approx(result["median_step_cpu_s"] / limit["sum_cpu_s"])


@pytest.mark.slow
def test_scaling_mode_runs_one_subprocess_per_cell(tmp_path):
    out = tmp_path / "scaling.json"
    proc = _run(
        "--scaling", "--model", "tiny", "--scaling-batches", "4", "--scaling-lengths", "2,3", "--mini-batch-size", "2",
        "--epochs", "1", "--steps", "1", "--warmup", "0", "--json", str(out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "scaling"
    cells = {(r["config"]["batch_size"], r["config"]["new_tokens"]): r for r in data["results"]}
    assert set(cells) == {(4, 2), (4, 3)}
    for (batch, length), result in cells.items():
        assert result["steps"][0]["new_tokens"] == batch * length
        assert "limit" not in result  # the table measures the engine only
    assert "| 4 | " in proc.stdout and "peak RSS" in proc.stdout


@pytest.mark.slow
def test_estimator_comparison_interleaves_arms_with_the_same_responses_per_step(tmp_path):
    """--compare gae:1,grpo:2 on tiny: each round runs both arms (one child each) with 4 responses per
    step, from 4 prompts for gae and 2 prompts x 2 responses for grpo, and reports ratios to gae."""
    out = tmp_path / "estimators.json"
    proc = _run(
        "--model", "tiny", "--compare", "gae:1,grpo:2", "--rounds", "1", "--steps", "1", "--warmup", "0",
        "--batch-size", "4", "--mini-batch-size", "2", "--epochs", "1", "--new-tokens", "2",
        "--kl-loss-coef", "0.1", "--kl-in-reward", "false", "--json", str(out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "estimators"
    [runs] = data["rounds"]
    assert set(runs) == {"gae G=1", "grpo G=2"}
    for label, estimator, group in (("gae G=1", "gae", 1), ("grpo G=2", "grpo", 2)):
        config = runs[label]["config"]
        assert (config["estimator"], config["samples_per_prompt"], config["batch_size"]) == (estimator, group, 4)
        assert (config["kl_loss_coef"], config["kl_in_reward"], config["init_kl_coef"]) == (0.1, "false", 0.2)
        [record] = runs[label]["steps"]
        assert record["prompts"] == 4 / group and record["new_tokens"] == 4 * 2
        assert "limit" not in runs[label]  # the comparison measures the engine only
    summary = data["summary"]
    assert summary["gae G=1"]["step_ratio"] == 1.0
    ratio = runs["grpo G=2"]["median_step_s"] / runs["gae G=1"]["median_step_s"]
    assert summary["grpo G=2"]["step_ratio"] == pytest.approx(ratio)
    assert "| grpo G=2 |" in proc.stdout and "interleaved rounds" in proc.stdout


def test_arms_presets_and_group_checks_of_the_command_line():
    bench = _load("bench_ppo")
    assert bench.parse_arms("gae, grpo:4,rloo:2") == [("gae", 1), ("grpo", 4), ("rloo", 2)]
    assert bench.parse_args(["--real-lm", "--compare", "gae:1,grpo:4"]).batch_size == 16
    for bad in (["--batch-size", "6", "--samples-per-prompt", "4"], ["--compare", "gae:1,grpo:1"],
                ["--compare", "gae:1,ppo:4"], ["--real-lm", "--compare", "gae,grpo:32"], ["--model", "tiny", "--heldout", "8"], ["--compare", "gae:1,grpo:four"]):
        with pytest.raises(SystemExit) as refused:
            bench.parse_args(bad)
        assert refused.value.code == 2, bad


def test_offline_default_preset_is_the_composed_offline_default():
    """--offline-default copies configs/train.yaml's offline default block: tied here, so they cannot drift apart."""
    from rlhf_cli.config.compose import compose_train_config

    cfg = compose_train_config(["output_dir=/tmp/unused"])
    args = _load("bench_ppo").parse_args(["--offline-default"])
    assert cfg.model.source == "review_gpt2" and args.model == "review"
    ppo = cfg.ppo
    expected = (ppo.batch_size, ppo.mini_batch_size, ppo.ppo_epochs, ppo.learning_rate, ppo.init_kl_coef)
    assert (args.batch_size, args.mini_batch_size, args.epochs, args.learning_rate, args.init_kl_coef) == expected
    assert (args.min_new_tokens, args.new_tokens) == (cfg.generation.response_min_tokens, cfg.generation.response_max_tokens)


def test_comparison_summary_takes_ratios_within_each_round():
    bench = _load("bench_ppo")

    def run(step, rss):
        return {"median_step_s": step, "median_step_cpu_s": step / 2, "peak_rss_mb": rss, "phases_s": {p: step / 5 for p in PHASES}}

    # The second round ran under twice the load: its ratio is still 0.5, not 1 / 4.
    rounds = [{"a": run(1.0, 100.0), "b": run(0.5, 90.0)}, {"a": run(4.0, 100.0), "b": run(2.0, 80.0)}]
    summary = bench.compare_summary(rounds, ["a", "b"])
    assert summary["b"]["step_ratio"] == 0.5 and summary["b"]["step_ratio_mean_se"] == (0.5, 0.0)
    assert summary["b"]["rss_ratio"] == pytest.approx(0.85) and summary["b"]["median_step_s"] == 1.25
    assert summary["a"]["step_ratio"] == 1.0 and summary["a"]["rounds"] == 2
    table = bench.compare_table(summary).splitlines()
    assert table[0] == "medians over 2 interleaved rounds"
    assert table[-1].startswith("| b | 1.250 | 0.625 | 0.250 | 0.250 | 0.250 | 85 MB | 0.500 (0.500 +- 0.000) | 0.850 |")


def test_scaling_table_lays_out_batches_by_lengths():
    bench = _load("bench_ppo")

    def result(batch, length, step, cpu, rss):
        config = {"batch_size": batch, "new_tokens": length}
        return {"config": config, "median_step_s": step, "median_step_cpu_s": cpu, "peak_rss_mb": rss}

    table = bench.scaling_table([result(16, 8, 0.5, 0.4, 400.0), result(16, 16, 1.0, 0.9, 410.0)], [16], [8, 16])
    assert table.splitlines()[1:] == [
        "| batch \\ new tokens | 8 | 16 |",
        "|---|---|---|",
        "| 16 | 0.50 s (0.40) / 400 MB | 1.00 s (0.90) / 410 MB |",
    ]


def test_summary_medians_and_rates():
    bench = _load("bench_ppo")
    records = [
        {"step_s": s, "cpu_s": s / 2, "new_tokens": 64.0, **{phase: s / 5 for phase in PHASES}} for s in (1.0, 3.0, 2.0)
    ]
    summary = bench.summarise(records, batch_size=4)
    assert summary["median_step_s"] == 2.0 and summary["median_step_cpu_s"] == 1.0
    assert summary["samples_per_s"] == 2.0 and summary["generated_tokens_per_s"] == 32.0
    assert summary["phases_s"] == {phase: 0.4 for phase in PHASES}


@pytest.mark.slow
def test_profile_script_prints_a_profile_and_the_step_timings():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable, str(BENCHMARKS / "profile_ppo.py"), "--model", "tiny", "--steps", "1", "--batch-size", "4",
            "--mini-batch-size", "2", "--epochs", "1", "--new-tokens", "3", "--top", "5",
        ],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Ordered by: internal time" in proc.stdout
    assert "'no_grad_passes'" in proc.stdout and "'optimisation'" in proc.stdout


def test_compare_trl_says_what_is_missing(tmp_path):
    """Without the peer's venv the comparison stops at once and names what to set up."""
    compare = _load("compare_trl")
    args = compare.parse_args(["--trl-python", str(tmp_path / "no-venv" / "python"), "--assets", str(tmp_path / "assets")])
    with pytest.raises(SystemExit, match="setup_trl_legacy.sh"):
        compare.ensure_assets(args)


def test_compare_trl_real_lm_says_what_is_missing(tmp_path):
    """The real-LM comparison takes the issue's sizes and stops at once without TRL's venv."""
    compare = _load("compare_trl")
    args = compare.parse_args(["--real-lm", "--trl-python", str(tmp_path / "no-venv" / "python")])
    assert (args.batch_size, args.mini_batch_size, args.epochs, args.new_tokens) == (16, 8, 4, 16)
    with pytest.raises(SystemExit, match="setup_trl_legacy.sh"):
        compare.main_real_lm(args)


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(BENCHMARKS.parent)}
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.slow
def test_generation_throughput_reports_tokens_per_second(tmp_path):
    """The GPU check's generation benchmark, reduced to a CPU run of the rollout's default cache."""
    out = tmp_path / "gen.json"
    done = _script("generation_throughput.py", "--device", "cpu", "--dtype", "float32", "--batch", "2", "--new-tokens", "3",
                   "--repeats", "1", "--variants", "dynamic,static", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for variant in ("dynamic", "static"):
        assert result[variant]["tokens_per_s"] > 0, result[variant]


@pytest.mark.slow
def test_sharding_memory_counts_the_shards_a_process_holds(tmp_path):
    """One process sharded with FSDP2 (a world of one) holds every byte: parameters and reference equal,
    Adam state twice the parameters (two moments), one measured step."""
    out = tmp_path / "mem.json"
    done = _script("sharding_memory.py", "--out", str(out), "+recipe=smoke", "ppo.sharding=fsdp2", "steps=2",
                   f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (rank,) = json.loads(out.read_text())["ranks"]
    held = rank["held_bytes"]
    assert rank["sharded"] and held["reference_params"] == held["policy_params"] > 0
    assert held["optimizer_state"] == 2 * held["policy_params"] and rank["s_per_step"] > 0
    peaks = rank["phase_peaks"]  # generation and training each measured (once past the first)
    assert set(peaks) == {"generation", "training"} and all(p["peak_heap_mb"] >= p["rise_heap_mb"] >= 0 for p in peaks.values())
