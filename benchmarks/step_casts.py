#!/usr/bin/env python
"""Host reads and float32<->bfloat16 casts in one engine step, counted per call site (issue 23).

A ``TorchFunctionMode`` sees every torch call made from Python during ``PPOTrainer.step`` (the
second step of a tiny GPT-2 run, so nothing is first-time work) and counts, by the innermost
``rlhf_cli`` frame that made it:

* **host reads**: ``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``nonzero``,
  ``masked_select``, ``cpu``, ``numpy`` and boolean-mask indexing. On a GPU each is a device sync
  when the tensor lives there; the report says which read host-built tensors only (index lists,
  lengths: no sync anywhere);
* **casts** between float32 and bfloat16 (``to``, ``float``, ``copy_`` across the two dtypes).

Reads made inside transformers' own forward (e.g. its attention-mask checks) are attributed to the
rlhf_cli frame that called the model. Casts inside autograd's backward are not Python calls and are
not seen.

    python benchmarks/step_casts.py --precision bf16
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select", "cpu", "numpy"}
CAST_CALLS = {"to", "float", "bfloat16", "type", "type_as", "copy_"}
HALVES = {torch.float32, torch.bfloat16}
# Sites whose reads touch host-built tensors only (index lists and lengths kept on the host): no device sync.
HOST_ONLY_SITES = {"rollout/packing.py:select", "rollout/packing.py:real_token_index"}


class StepCounter(TorchFunctionMode):
    """Counts host reads and fp32<->bf16 casts by site ("module.py:function") while active;
    ``phase`` labels what is being counted (set it from outside, e.g. per mini-batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "step"
        self.reads: collections.Counter = collections.Counter()
        self.casts: collections.Counter = collections.Counter()

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/rlhf_cli/" in frame.filename:
                return f"{frame.filename.split('/rlhf_cli/')[1]}:{frame.name}"
        return "(outside rlhf_cli)"

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "__getitem__" and _bool_index(args)):
            self.reads[(self.phase, self._site())] += 1
        elif name in CAST_CALLS and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            if isinstance(source, torch.Tensor) and {source.dtype, out.dtype} == HALVES:
                self.casts[(self.phase, self._site())] += 1
        return out


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def tiny_trainer(precision: str, *, batch_size: int = 8, mini_batch_size: int = 4, ppo_epochs: int = 2):
    """A tiny GPT-2 PPOTrainer (the tests' word tokenizer), and a fixed batch to step on."""
    sys.path.insert(0, str(ROOT))
    from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from tests.tiny import make_tiny_gpt2, make_word_tokenizer

    tokenizer = make_word_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead(make_tiny_gpt2(tokenizer))
    config = PPOConfig(batch_size=batch_size, mini_batch_size=mini_batch_size, ppo_epochs=ppo_epochs, precision=precision, seed=0)
    trainer = PPOTrainer(config, model, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(3, 50, (4,), generator=generator) for _ in range(batch_size)]
    responses = [torch.randint(3, 50, (6,), generator=generator) for _ in range(batch_size)]
    scores = [torch.tensor(float(i % 3) - 1.0) for i in range(batch_size)]
    return trainer, (queries, responses, scores)


def count_step(precision: str) -> tuple[StepCounter, int]:
    """Counts of the second step, each mini-batch's under phase "mini-batch"; and the mini-batches run."""
    trainer, batch = tiny_trainer(precision)
    trainer.step(*batch)  # warm-up: first-time work is not counted
    counter, engine = StepCounter(), trainer.engine if hasattr(trainer, "engine") else trainer
    original = engine._train_minibatch
    minibatches = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter.phase = "mini-batch"
        try:
            return original(*args, **kwargs)
        finally:
            counter.phase, _ = "step", minibatches.append(1)

    engine._train_minibatch = counted
    with counter:
        trainer.step(*batch)
    return counter, len(minibatches)


def report(precision: str) -> str:
    counter, minibatches = count_step(precision)
    lines = [f"precision={precision}: one step, {minibatches} mini-batches (tiny GPT-2, B=8, M=4, 2 epochs)"]
    for title, table in (("host reads", counter.reads), ("fp32<->bf16 casts", counter.casts)):
        lines.append(f"  {title}: {sum(table.values())} in all")
        for (phase, site), n in sorted(table.items(), key=lambda kv: (kv[0][0], -kv[1])):
            host = " (host-built tensors: no device sync)" if title == "host reads" and site in HOST_ONLY_SITES else ""
            lines.append(f"    {phase:10s} {n:4d} ({n / minibatches if phase == 'mini-batch' else n:.1f} per "
                         f"{'mini-batch' if phase == 'mini-batch' else 'step'})  {site}{host}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    args = ap.parse_args(argv)
    for precision in (("fp32", "bf16") if args.precision == "both" else (args.precision,)):
        print(report(precision))


if __name__ == "__main__":
    main()
