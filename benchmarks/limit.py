"""The machine's limit for one PPO step: each unavoidable piece timed alone in plain torch.

On the same batch the engine just trained on (same queries, same responses, same sizes):

1. one generation with the KV cache — the language model's ``generate`` on the left-padded queries,
   exactly ``new_tokens`` new tokens, sampling from the full distribution;
2. one reference forward without gradient (logits only where response tokens are predicted, and
   their log-probabilities);
3. ``ppo_epochs`` x (forward + backward + Adam step) over the mini-batches: transformer, LM head
   and value head on the response positions, a PPO-shaped loss (probability ratio times advantage,
   plus a squared value error).

In ``precision="bf16"`` the copies of the language models hold bfloat16 weights and the Adam step
runs on float32 masters with a copy back (the straightforward form of the engine's bf16 mode);
``"autocast"`` runs the same float32 pieces under bfloat16 autocast. The log-softmax over the
vocabulary is float32 in every mode, as the engine computes it.

Anything the engine does beyond these (the policy's own no-gradient pass for old log-probs and
values, GAE, statistics, input checks, packing, Python bookkeeping) is overhead relative to this
sum. The pieces run on copies of the weights, so the trainer's state is not touched.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor

from rlhf_cli.rollout.packing import PackedBatch, _stack_padded, pack_batch


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall-clock and median CPU seconds of ``fn`` over ``repeats`` calls after a warm-up call."""
    fn()  # warm-up: first-call allocations, Adam state creation
    wall, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def _response_logprobs(lm: torch.nn.Module, batch: PackedBatch, hidden: Tensor) -> Tensor:
    """Log-probabilities [B, T] of the response tokens from the hidden states of the last T + 1 positions."""
    logits = lm.lm_head(hidden).float()
    return logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _response_hidden(lm: torch.nn.Module, batch: PackedBatch) -> Tensor:
    """Last-layer hidden states [B, T, H] at the positions that predict the response tokens."""
    width = batch.response_width
    hidden = lm.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    return hidden[:, -(width + 1) : -1]


def measure_limit(
    policy: torch.nn.Module,
    reference_lm: torch.nn.Module,
    queries: list[Tensor],
    responses: list[Tensor],
    *,
    pad_token_id: int,
    new_tokens: int,
    mini_batch_size: int,
    ppo_epochs: int,
    learning_rate: float,
    repeats: int = 3,
    precision: str = "fp32",
) -> dict[str, float]:
    """Median wall-clock (``*_s``) and CPU (``*_cpu_s``) seconds of each piece and their sums
    (see the module docstring).

    ``policy`` is a value-head model (``pretrained_model`` a ``base_model`` + ``lm_head``, ``v_head``);
    ``reference_lm`` a plain language model, in the precision the engine ran it in.
    ``precision`` is ``fp32``, ``bf16`` (bfloat16 weights, float32 masters) or ``autocast``.
    """
    lm = copy.deepcopy(policy.pretrained_model)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "autocast" else contextlib.nullcontext
    )
    v_head = copy.deepcopy(policy.v_head)
    lm.eval()  # the engine runs with dropout disabled; eval() makes sure no dropout mask is drawn
    batch = pack_batch(queries, responses, pad_token_id=pad_token_id, is_encoder_decoder=False)
    width_q = max(int(q.shape[0]) for q in queries)
    prompt_ids, prompt_mask = _stack_padded(queries, width_q, pad_token_id, left=True)

    @torch.no_grad()
    def generation() -> None:
        with autocast():
            _generate()

    def _generate() -> None:
        lm.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad_token_id,
        )

    @torch.no_grad()
    def reference_forward() -> None:
        width = batch.response_width
        with autocast():
            out = reference_lm(**batch.model_inputs(), logits_to_keep=width + 1)
        logits = out.logits[:, :-1].float()
        logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    lm_params = [p for p in lm.parameters() if p.requires_grad]
    if precision == "bf16":
        masters = [p.detach().float() for p in lm_params]  # lm is already bfloat16 (a copy of the engine's)
        params = masters + list(v_head.parameters())
    else:
        masters = []
        params = lm_params + list(v_head.parameters())
    fused = lm_params[0].device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(params, lr=learning_rate, fused=fused or None)

    @torch.no_grad()
    def adam_step() -> None:
        for weight, master in zip(lm_params, masters):
            master.grad = weight.grad.float()
        optimizer.step()
        for weight, master in zip(lm_params, masters):
            weight.copy_(master)
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(batch.response_ids.shape, generator=generator)
    returns = torch.randn(batch.response_ids.shape, generator=generator)
    starts = range(0, batch.batch_size, mini_batch_size)
    minibatches = [list(range(s, min(s + mini_batch_size, batch.batch_size))) for s in starts]
    selected = [(batch.select(rows), advantages[rows], returns[rows]) for rows in minibatches]

    def optimisation() -> None:
        lm.train()
        for _ in range(ppo_epochs):
            for mb, adv, ret in selected:
                with autocast():
                    hidden = _response_hidden(lm, mb)
                    logprobs = _response_logprobs(lm, mb, hidden)
                    values = v_head(hidden)
                ratio = torch.exp(logprobs - logprobs.detach())
                loss = -(adv * ratio).mean() + 0.1 * (values - ret).square().mean()
                loss.backward()
                adam_step()
                optimizer.zero_grad()
                lm.zero_grad(set_to_none=True)

    pieces: dict[str, float] = {}
    for name, fn in (("generation", generation), ("reference_forward", reference_forward), ("optimisation", optimisation)):
        pieces[f"{name}_s"], pieces[f"{name}_cpu_s"] = _median_seconds(fn, repeats)
    pieces["sum_s"] = pieces["generation_s"] + pieces["reference_forward_s"] + pieces["optimisation_s"]
    pieces["sum_cpu_s"] = pieces["generation_cpu_s"] + pieces["reference_forward_cpu_s"] + pieces["optimisation_cpu_s"]
    return pieces
