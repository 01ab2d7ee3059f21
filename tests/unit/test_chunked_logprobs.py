"""The chunked LM head + log-softmax against the straightforward computation: logits [N, V], log-softmax, gather.

Values and gradients must agree to float rounding in float32 and bfloat16, for any chunk size,
with and without a bias; log-probabilities must never be positive (a fused path that returned
positive log-probabilities has collapsed training elsewhere).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_cli.algo.chunked_logprobs import chunked_head_logprobs, tokens_per_chunk
from rlhf_cli.algo.functional import entropy_from_logits, logprobs_from_logits


def _inputs(dtype: torch.dtype, bias: bool, seed: int = 0, n: int = 37, h: int = 24, v: int = 301):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=gen)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)  # a loss that weights every token differently
    return hidden, weight, b, labels, upstream


def _straightforward(hidden, weight, bias, labels):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits.detach())


def _grads(logprobs, upstream, tensors):
    return torch.autograd.grad((logprobs * upstream).sum(), [t for t in tensors if t is not None])


# bf16: logits and the logits' gradient are rounded to bf16 in both paths; the weight gradient sums
# over tokens in a different order (float32 across chunks), so it agrees to bf16 rounding.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_values_and_gradients_equal_the_straightforward_path(dtype, chunk, bias):
    hidden, weight, b, labels, upstream = _inputs(dtype, bias, seed=chunk)
    out = chunked_head_logprobs(hidden, weight, b, labels, chunk=chunk)
    expected_logprobs, expected_entropy = _straightforward(hidden, weight, b, labels)

    assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)  # same rounded logits
    torch.testing.assert_close(out.entropy, expected_entropy, atol=1e-4, rtol=1e-5)
    assert not out.entropy.requires_grad
    for grad, expected in zip(_grads(out.logprobs, upstream, (hidden, weight, b)),
                              _grads(expected_logprobs, upstream, (hidden, weight, b))):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), expected.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_are_never_positive_even_for_peaked_logits(dtype):
    hidden, weight, _, labels, _ = _inputs(dtype, bias=False)
    with torch.no_grad():
        peaked = chunked_head_logprobs(hidden * 50, weight * 50, None, labels, chunk=5)
        argmax = (hidden.float() @ weight.float().t()).argmax(-1)
        certain = chunked_head_logprobs(hidden * 50, weight * 50, None, argmax, chunk=5)
    assert (peaked.logprobs <= 0).all() and (certain.logprobs <= 0).all()
    assert torch.isfinite(peaked.logprobs).all() and (peaked.entropy >= -1e-6).all()


def test_gradcheck_in_float64():
    hidden, weight, b, labels, _ = _inputs(torch.float64, bias=True, n=5, h=3, v=7)
    assert torch.autograd.gradcheck(lambda h, w, bb: chunked_head_logprobs(h, w, bb, labels, chunk=2).logprobs, (hidden, weight, b))


def test_tokens_per_chunk_and_shape_errors():
    assert tokens_per_chunk(49152) == 341 and tokens_per_chunk(10**9) == 1
    hidden, weight, _, labels, _ = _inputs(torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"hidden \[N, H\]"):
        chunked_head_logprobs(hidden.unsqueeze(0), weight, None, labels)


def test_without_the_entropy_the_logprobs_and_gradients_are_the_same():
    """The no-gradient passes skip the entropy (``entropy=False``): nothing else may change, to the bit."""
    hidden, weight, b, labels, upstream = _inputs(torch.float32, bias=True)
    full = chunked_head_logprobs(hidden, weight, b, labels, chunk=8)
    bare = chunked_head_logprobs(hidden, weight, b, labels, chunk=8, entropy=False)
    assert bare.entropy is None
    assert torch.equal(bare.logprobs, full.logprobs)
    for grad, expected in zip(_grads(bare.logprobs, upstream, (hidden, weight, b)), _grads(full.logprobs, upstream, (hidden, weight, b))):
        assert torch.equal(grad, expected)


def test_impossible_tokens_add_nothing_to_the_entropy():
    """A token whose logit is −inf (p = 0) contributes 0·(−inf) := 0 to Σ p·log p, not NaN."""
    hidden, weight, b, labels, _ = _inputs(torch.float32, bias=True)
    banned = torch.zeros_like(b, dtype=torch.bool)
    banned[1::3] = True
    b = b.detach().masked_fill(banned, float("-inf"))
    labels = torch.where(banned[labels], labels + 1, labels)  # the labels themselves are possible
    out = chunked_head_logprobs(hidden, weight, b, labels, chunk=8)
    allowed = torch.nn.functional.linear(hidden, weight, b).detach()[:, ~banned]
    expected = -(allowed.softmax(-1) * allowed.log_softmax(-1)).sum(-1)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.logprobs).all()
    torch.testing.assert_close(out.entropy, expected, atol=1e-4, rtol=1e-5)
