"""Issue 23: host reads and float32<->bfloat16 casts in one engine step, counted by call site with
``benchmarks/step_casts.py`` (a TorchFunctionMode), so that an avoidable one added later fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rlhf_cli.algo.functional import masked_var
from tests.tiny import make_tiny_gpt2, make_word_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# The one read per forward made inside transformers' own model code (its attention-mask check),
# attributed to the rlhf_cli frame that called the model.
TRANSFORMERS_FORWARD = "models/logit_positions.py:logits_at"
# The divergence guard's one deliberate read per optimiser step (issue 25): whether to apply the update
# must be known on the host, since skipping an optimiser step cannot be expressed on the device (zeroed
# gradients would still move Adam's moments and step count). Measured at ~1 % of the optimisation phase.
GUARD_DECISION = "ppo/engine.py:_backward_and_step"


def _step_casts():
    spec = importlib.util.spec_from_file_location("benchmarks_step_casts", BENCHMARKS / "step_casts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def counted():
    module = _step_casts()
    return module, {precision: module.count_step(precision) for precision in ("fp32", "bf16")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_minibatch_reads_nothing_from_the_device(counted, precision):
    """rlhf_cli's own code reads only host-built tensors (index lists, lengths) in a mini-batch, and the
    divergence guard's decision once per optimiser step: no other device sync (before: the value
    stats' two masked variances counted their mask on the host)."""
    module, results = counted
    counter, minibatches = results[precision]
    sites = {site for (phase, site) in counter.reads if phase == "mini-batch"}
    assert sites <= module.HOST_ONLY_SITES | {TRANSFORMERS_FORWARD, GUARD_DECISION}, sites
    assert counter.reads[("mini-batch", TRANSFORMERS_FORWARD)] <= minibatches
    assert counter.reads[("mini-batch", GUARD_DECISION)] <= minibatches


def test_the_only_casts_are_the_master_weights_the_value_head_and_the_chunked_head(counted):
    """bf16: per optimiser step, each trainable weight's gradient up and its master back down (the
    master-weight scheme itself); the value head's input and the chunked LM head's logits upcast. fp32: none."""
    _, results = counted
    assert sum(results["fp32"][0].casts.values()) == 0
    counter, minibatches = results["bf16"]
    sites = {site for (_, site) in counter.casts}
    assert sites == {"ppo/precision.py:step", "models/value_head.py:forward", "algo/chunked_logprobs.py:_chunk_logits"}
    weights = len(list(make_tiny_gpt2(make_word_tokenizer()).parameters()))  # all trainable, each with a master
    assert counter.casts[("mini-batch", "ppo/precision.py:step")] == 2 * weights * minibatches
    assert counter.casts[("mini-batch", "models/value_head.py:forward")] == minibatches


def test_masked_var_with_a_count_is_bit_equal_and_sync_free():
    generator = torch.Generator().manual_seed(0)
    for p in (0.02, 0.3, 0.9):
        values = torch.randn(4, 50, generator=generator) * 3 + 2
        mask = torch.rand(4, 50, generator=generator) < p
        assert torch.equal(masked_var(values, mask, count=mask.sum()), masked_var(values, mask))
    one = torch.zeros(4, dtype=torch.bool)
    one[1] = True
    assert masked_var(torch.arange(4.0), one, count=one.sum()) == 0  # one value: no spread, as without count
    assert torch.isnan(masked_var(torch.ones(3), torch.zeros(3, dtype=torch.bool), count=torch.tensor(0)))
