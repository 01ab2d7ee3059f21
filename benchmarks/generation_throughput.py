"""Rollout generation throughput (new tokens per second) with and without a static KV cache and
torch.compile, and by generation batch size, through the rollout's own ``generate_responses``, on the default model
(review GPT-2) or any composed one (``--config +recipe=smollm2_imdb model.gguf_file=PATH``).

    python benchmarks/generation_throughput.py --device cuda --dtype bfloat16 --out gen.json

Variants: ``dynamic`` (the rollout's default: a growing KV cache, eager), ``static`` (a preallocated
cache, ``generation_config.disable_compile``: eager) and ``static+compile`` (the same cache, with
transformers compiling the decoding step, as it does for a static cache on a GPU by default). Every
response is exactly ``--new-tokens`` long (``min_new_tokens``), so the token count is known. Each
variant runs once to warm up (and compile), then ``--repeats`` timed times; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, queries, settings: dict, device: str, new_tokens: int, repeats: int, **variant) -> dict:
    from rlhf_cli.rollout.generation import generate_responses

    cpu = []

    def once() -> float:
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        responses = generate_responses(model, queries, max_new_tokens=new_tokens, device=device, stop_at_eos=False,
                                       min_new_tokens=new_tokens, **settings, **variant)
        _sync(device)
        assert all(len(r) == new_tokens for r in responses)
        cpu.append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    warmup = once()
    times = [once() for _ in range(repeats)]
    seconds = statistics.median(times)
    return {"warmup_s": round(warmup, 3), "median_s": round(seconds, 4), "median_cpu_s": round(statistics.median(cpu[1:]), 4),
            "tokens_per_s": round(len(queries) * new_tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="dynamic,static,static+compile")
    parser.add_argument("--chunks", default="", help="comma-separated generation batch sizes (rows per generate call) "
                        "to time with the dynamic cache as variants chunk<N>; default: the whole batch in one call")
    parser.add_argument("--config", nargs="*", default=[], help="overrides composing the model and prompts, e.g. "
                        "+recipe=smollm2_imdb model.gguf_file=PATH (default: the offline default's review GPT-2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.data.prompts import build_prompt_data
    from rlhf_cli.engine.heldout import model_generation_settings
    from rlhf_cli.models import load_policy_and_tokenizer

    cfg = compose_train_config(list(args.config))
    policy, tokenizer = load_policy_and_tokenizer(cfg.model)
    policy = policy.to(args.device, getattr(torch, args.dtype)).eval()
    data = build_prompt_data(cfg.dataset, tokenizer, seed=0)
    queries = [torch.as_tensor(data.train[i]["input_ids"]) for i in range(args.batch)]
    settings = model_generation_settings(cfg, tokenizer, policy)
    settings["batch_size"] = None  # one generate() call for the whole batch (the chunk<N> variants set it)
    variants = {
        "dynamic": {},
        "static": {"cache_implementation": "static", "disable_compile": True},
        "static+compile": {"cache_implementation": "static"},
        **{f"chunk{n}": {"batch_size": int(n)} for n in args.chunks.split(",") if n},
    }
    results = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens,
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    for name in args.variants.split(","):
        try:
            variant = {**settings, **variants[name]}
            results[name] = measure(policy, queries, {k: v for k, v in variant.items() if k not in variants[name]},
                                    args.device, args.new_tokens, args.repeats, **variants[name])
        except Exception as err:  # a variant this transformers/torch cannot run is a result too
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        print(name, results[name], flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
