#!/usr/bin/env python
"""Legacy TRL 0.11.4's PPO loop on the real LM, for ``compare_trl.py --real-lm``: run with TRL's venv.

The TRL-style loop the issue measures, on the model directory and the very prompts (token ids) our
benchmark uses: per step, B prompts drawn without replacement by a seeded NumPy generator,
``PPOTrainer.generate`` (exactly ``--new-tokens`` new tokens, ``do_sample, top_k=0, top_p=1``),
decoding, VADER on the response text, ``PPOTrainer.step``. ``--mixed-precision bf16`` passes TRL's
own ``accelerator_kwargs={"mixed_precision": "bf16"}``. Writes per-step seconds (generation,
scoring, step and TRL's ``time/ppo/*``) and peak RSS as JSON. Imports nothing from rlhf_cli.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", required=True, help="Hugging Face directory of the policy (and reference)")
    ap.add_argument("--prompts", required=True, help='JSON list of {"query": text, "input_ids": [...]}')
    ap.add_argument("--steps", type=int, default=3, help="steps in all (the caller drops the first as warm-up)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mini-batch-size", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1.41e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def _tokenizer(model_dir: str, fast_class: type) -> object:
    """The directory's tokenizer.json, read directly: rlhf_cli's conversion is written by transformers 5,
    whose tokenizer_config.json names a class (TokenizersBackend) transformers 4.46 does not have."""
    import os

    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        special = {k: v for k, v in json.load(f).items() if k in ("eos_token", "bos_token", "pad_token", "unk_token") and isinstance(v, str)}
    tokenizer = fast_class(tokenizer_file=os.path.join(model_dir, "tokenizer.json"), **special)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, set_seed
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    set_seed(args.seed)
    tokenizer = _tokenizer(args.model_dir, PreTrainedTokenizerFast)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.model_dir)
    kwargs = {"mixed_precision": args.mixed_precision} if args.mixed_precision != "no" else {}
    config = PPOConfig(
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        seed=args.seed,
        accelerator_kwargs=kwargs,
    )
    trainer = PPOTrainer(config, model, None, tokenizer)
    vader = SentimentIntensityAnalyzer()
    generation = dict(
        do_sample=True, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    rng = np.random.default_rng(args.seed)
    steps = []
    for _ in range(args.steps):
        rows = rng.choice(len(prompts), size=args.batch_size, replace=False)
        queries = [torch.tensor(prompts[i]["input_ids"], dtype=torch.long) for i in rows]
        start, cpu_start = time.perf_counter(), time.process_time()
        responses = trainer.generate(queries, batch_size=args.batch_size, return_prompt=False, **generation)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        generated = time.perf_counter()
        scores = [torch.tensor(vader.polarity_scores(t)["compound"]) for t in texts]
        scored = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        done, cpu_done = time.perf_counter(), time.process_time()
        steps.append({
            "time_s": done - start,
            "cpu_s": cpu_done - cpu_start,  # this process's CPU time: less sensitive to other load
            "gen_s": generated - start,
            "score_s": scored - generated,
            "step_s": done - scored,
            "trl_time/ppo/forward_pass": float(stats["time/ppo/forward_pass"]),
            "trl_time/ppo/optimize_step": float(stats["time/ppo/optimize_step"]),
            "mean_reward": float(np.mean([float(s) for s in scores])),
        })
    import transformers
    import trl

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "steps": steps, "peak_rss_mb": peak, "versions": versions}, f, indent=1)


if __name__ == "__main__":
    main()
