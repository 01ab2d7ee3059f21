"""Throughput and peak memory of `rlhf reward`'s trainer against TRL's current ``RewardTrainer``.

Same backbone (the shipped review GPT-2: TRL's as ``AutoModelForSequenceClassification`` with one
label; ours with its scalar value head as the offline default trains it, or with ``--backbone
classifier`` TRL's very classifier, loaded as ``model=local``), same pairs (the offline default's IMDb pairs),
same batch size, one epoch, AdamW, dropout off, fp32, CPU. Each measurement is its own process (peak
RSS is per process), and the two implementations alternate (A B A B ...) so load drifts on a shared
machine hit both alike. Pairs/s counts the training loop only (model and data already built).

    python benchmarks/reward_vs_trl.py --trl-python /tmp/19-trl/bin/python --repeats 3 [--backbone classifier]

TRL must be installed in the environment of ``--trl-python`` (ours in this one); the side venv of the
measurements in benchmarks/README.md shares this venv's torch and transformers and adds TRL alone:

    python3.11 -m venv /tmp/19-trl
    echo "$VIRTUAL_ENV/lib/python3.11/site-packages" > /tmp/19-trl/lib/python3.11/site-packages/main.pth
    /tmp/19-trl/bin/pip install --no-deps trl       # its dependencies are this venv's

One run of one side: ``--impl ours|trl`` prints a JSON line. Peak memory is reported twice: the whole
process's (data loading included, the same code on both sides) and the training loop's own (VmHWM reset
just before the first step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM), so the loop's own peak
    is measured apart from the data loading both sides share."""
    Path("/proc/self/clear_refs").write_text("5")


def _window_peak_mib() -> float:
    """Peak resident memory since the last :func:`_reset_peak` (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pairs(count: int):
    """(chosen texts, rejected texts) of the offline default's first ``count`` training pairs."""
    from omegaconf import OmegaConf

    from rlhf_cli.config.reward_schema import PreferenceDataConfig
    from rlhf_cli.data.imdb_local import release_imdb_table
    from rlhf_cli.data.imdb_pairs import imdb_pair_rows
    from rlhf_cli.models import load_tokenizer
    from rlhf_cli.config.schema import ModelConfig

    tokenizer = load_tokenizer(OmegaConf.structured(ModelConfig(source="review_gpt2")))
    rows = imdb_pair_rows(OmegaConf.structured(PreferenceDataConfig()), "train", count, tokenizer, seed=0)
    release_imdb_table()  # as `rlhf reward` does once its pairs are built (for both sides)
    return rows, tokenizer


def _classifier_copy() -> Path:
    """The review GPT-2 saved as ``GPT2ForSequenceClassification`` (one label, head seeded 0) in a temporary
    directory, with its tokenizer: the backbone TRL's side trains, on disk for ``model=local``."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.assets import review_gpt2_dir

    directory = Path(tempfile.mkdtemp(prefix="review-gpt2-classifier-"))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(review_gpt2_dir()), num_labels=1, dtype=torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(review_gpt2_dir())).save_pretrained(directory)
    del model
    return directory


def run_ours(pairs: int, batch: int, lr: float, backbone: str = "value_head") -> dict:
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.reward_model.backbone import load_reward_backbone
    from rlhf_cli.reward_model.data import tokenize_pairs
    from rlhf_cli.reward_model.trainer import RewardModelTrainer

    rows, _ = _pairs(pairs)
    if backbone == "classifier":  # TRL's very model: the review GPT-2 as a one-label classifier, as model=local
        model_cfg = ModelConfig(source="pretrained", name_or_path=str(_classifier_copy()))
    else:  # the offline default's: the review GPT-2 with a scalar value head
        model_cfg = ModelConfig(source="review_gpt2")
    loaded = load_reward_backbone(OmegaConf.structured(model_cfg))  # what `rlhf reward` loads
    if backbone == "classifier":
        shutil.rmtree(model_cfg.name_or_path)
    model, tokenizer, head = loaded.model, loaded.tokenizer, loaded.head
    trainer = RewardModelTrainer(model, tokenizer, tokenize_pairs(rows, tokenizer, 512, head), learning_rate=lr,
                                 batch_size=batch, accelerator=Accelerator(cpu=True), head=head)
    rss_before = _rss_mib()
    _reset_peak()
    started, cpu_started = time.perf_counter(), time.process_time()
    for index in range(trainer.batches_per_epoch):
        trainer.step(0, index)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"impl": f"rlhf_cli ({head})", "pairs": trainer.batches_per_epoch * batch, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "rss_before_loop_mib": rss_before, "loop_peak_rss_mib": _window_peak_mib()}


def run_trl(pairs: int, batch: int, lr: float) -> dict:
    import tempfile

    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from rlhf_cli.assets import review_gpt2_dir

    rows, _ = _pairs(pairs)
    directory = str(review_gpt2_dir())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    data = datasets.Dataset.from_dict({"chosen": rows.chosen_texts, "rejected": rows.rejected_texts})

    class LoopClock(TrainerCallback):
        """Wall time of the training loop alone (from the first step's start to the end of training)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_before = _rss_mib()
            _reset_peak()

        def on_step_begin(self, args, state, control, **kwargs):
            if getattr(self, "started", None) is None:
                self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started
            self.cpu_seconds = time.process_time() - self.cpu_started
            self.loop_peak = _window_peak_mib()

    clock = LoopClock()
    with tempfile.TemporaryDirectory() as out:
        args = trl.RewardConfig(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=lr,
                                lr_scheduler_type="constant", warmup_steps=0, max_length=512, report_to="none",
                                save_strategy="no", logging_steps=10_000, use_cpu=True, disable_dropout=True,
                                dataloader_drop_last=True, bf16=False, fp16=False, seed=0)
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    return {"impl": f"trl {trl.__version__}", "pairs": (pairs // batch) * batch, "seconds": clock.seconds,
            "cpu_seconds": clock.cpu_seconds, "rss_before_loop_mib": clock.rss_before, "loop_peak_rss_mib": clock.loop_peak}


def _one(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.impl == "ours":
        result = run_ours(args.pairs, args.batch, args.lr, args.backbone)
    else:
        result = run_trl(args.pairs, args.batch, args.lr)
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    # Pairs per CPU-second (one thread): far less sensitive than wall time to other jobs on a shared machine.
    result["pairs_per_cpu_s"] = result["pairs"] / result["cpu_seconds"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # What training itself adds on top of the process (imports, data, model): comparable across the two.
    result["training_rss_growth_mib"] = result["loop_peak_rss_mib"] - result["rss_before_loop_mib"]
    print(json.dumps(result))


def _compare(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    common = ["--pairs", str(args.pairs), "--batch", str(args.batch), "--threads", str(args.threads), "--lr", str(args.lr),
              "--backbone", args.backbone]
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        for impl, python in (("ours", sys.executable), ("trl", args.trl_python)):
            done = subprocess.run([python, __file__, "--impl", impl, *common], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{impl} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[impl].append(result)
            print(json.dumps(result), flush=True)
    for impl, runs in results.items():
        speeds = [r["pairs_per_s"] for r in runs]
        cpu = [r["pairs_per_cpu_s"] for r in runs]
        print(f"{runs[0]['impl']}: {statistics.median(speeds):.1f} pairs/s wall, {statistics.median(cpu):.1f} pairs per CPU-s "
              f"(medians of {len(runs)}: {', '.join(f'{s:.1f}' for s in speeds)} / {', '.join(f'{s:.1f}' for s in cpu)}), peak RSS {max(r['peak_rss_mib'] for r in runs):.0f} MiB "
              f"(in the training loop {max(r['loop_peak_rss_mib'] for r in runs):.0f} MiB), "
              f"of which the training loop added {max(r['training_rss_growth_mib'] for r in runs):.0f} MiB")
    for key in ("pairs_per_s", "pairs_per_cpu_s"):
        ratio = [a[key] / b[key] for a, b in zip(results["ours"], results["trl"])]
        print(f"ratio rlhf_cli / TRL of {key} per interleaved round: {', '.join(f'{r:.2f}' for r in ratio)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("ours", "trl"))
    parser.add_argument("--trl-python", default=None, help="python of the environment where trl is installed")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", choices=("value_head", "classifier"), default="value_head",
                        help="ours: the review GPT-2 with a value head (the offline default) or as TRL's classifier")
    args = parser.parse_args()
    if args.impl:
        _one(args)
    elif args.trl_python:
        _compare(args)
    else:
        parser.error("give --impl ours|trl for one run, or --trl-python PATH to compare interleaved")


if __name__ == "__main__":
    main()
