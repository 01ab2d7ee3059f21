"""response_outputs against the straightforward computation: one full forward, slice, log-softmax.

The engine computes the LM head only where a response token is predicted, and for responses of
different lengths only at their real tokens (a boolean ``logits_to_keep``). These tests check that
doing so changes no number: logits, log-probabilities, values and gradients at real tokens equal
those of a forward pass over every position.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_cli import AutoModelForCausalLMWithValueHead
from rlhf_cli.models import disable_dropout
from rlhf_cli.ppo.forward import response_outputs
from rlhf_cli.rollout.packing import real_token_index
from rlhf_cli.rollout.packing import pack_batch
from tests.tiny import make_tiny_gpt2


def _policy(word_tokenizer):
    torch.manual_seed(0)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, seed=3))
    disable_dropout(policy)  # the value head's dropout would make two passes differ
    return policy


def _batch(response_lengths: list[int], vocab: int):
    gen = torch.Generator().manual_seed(7)
    queries = [torch.randint(3, vocab, (n,), generator=gen) for n in (3, 1, 5, 2)[: len(response_lengths)]]
    responses = [torch.randint(3, vocab, (n,), generator=gen) for n in response_lengths]
    return pack_batch(queries, responses, pad_token_id=0, is_encoder_decoder=False)


def _straightforward(policy, batch):
    """Logits [B, T, V], log-probabilities [B, T] and values [B, T] from a forward over all positions."""
    logits, _, values = policy(**batch.model_inputs())
    width_q = batch.input_ids.shape[1] - batch.response_width
    columns = slice(width_q - 1, width_q - 1 + batch.response_width)
    logits, values = logits[:, columns], values[:, columns]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return logits, logprobs, values


def test_real_token_index_lists_rows_and_columns_row_major():
    rows, cols = real_token_index([2, 3, 1], torch.device("cpu"))
    assert rows.tolist() == [0, 0, 1, 1, 1, 2]
    assert cols.tolist() == [0, 1, 0, 1, 2, 0]


@pytest.mark.parametrize("response_lengths", [[4, 4, 4, 4], [4, 1, 3, 2]], ids=["equal_lengths", "ragged"])
def test_outputs_and_gradients_equal_the_full_forward(word_tokenizer, response_lengths):
    policy = _policy(word_tokenizer)
    batch = _batch(response_lengths, len(word_tokenizer))
    real = batch.response_mask.bool()

    out = response_outputs(policy, batch)
    loss = (out.logprobs * batch.response_mask).sum() + (out.values * batch.response_mask).sum()
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    logits, logprobs, values = _straightforward(policy, batch)
    expected_loss = (logprobs * batch.response_mask).sum() + (values * batch.response_mask).sum()
    expected_grads = torch.autograd.grad(expected_loss, list(policy.parameters()))

    assert out.logits.shape == logits.shape and out.values.shape == values.shape
    torch.testing.assert_close(out.logits[real], logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logprobs[real], logprobs[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.values[real], values[real], atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_ragged_padding_positions_hold_zeros(word_tokenizer):
    """Positions after a response's end are not computed: zero logits and values, finite log-probs."""
    policy = _policy(word_tokenizer)
    batch = _batch([4, 1, 3, 2], len(word_tokenizer))
    with torch.no_grad():
        out = response_outputs(policy, batch)
    padding = ~batch.response_mask.bool()
    assert padding.any()
    assert torch.count_nonzero(out.logits[padding]) == 0
    assert torch.count_nonzero(out.values[padding]) == 0
    assert torch.isfinite(out.logprobs).all()


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(LlamaForCausalLM(config))
    disable_dropout(policy)
    return policy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("response_lengths", [[4, 4, 4, 4], [4, 1, 3, 2]], ids=["equal_lengths", "ragged"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_head_input_is_contiguous(word_tokenizer, arch, response_lengths, frozen, dtype):
    """The LM head never gets a strided slice of the hidden states. F.linear of a non-contiguous 3-D
    input with a weight that does not require grad (a frozen reference) takes matmul's expand + bmm
    path, copying the [V, H] weight once per row: 87x the cost of the same product on a contiguous
    input (SmolLM2, bf16). Checked on the head's actual input, for every kind of module and dtype."""
    policy = _tiny_llama(len(word_tokenizer)) if arch == "llama" else _policy(word_tokenizer)
    policy.to(dtype).requires_grad_(not frozen)
    seen: list[tuple[int, bool]] = []
    head = policy.pretrained_model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _module, args: seen.append((args[0].dim(), args[0].is_contiguous())))
    with torch.no_grad():
        response_outputs(policy, _batch(response_lengths, len(word_tokenizer)), values=not frozen)
    assert seen and all(contiguous for _, contiguous in seen), seen


@pytest.mark.parametrize("response_lengths", [[4, 4, 4, 4], [4, 1, 3, 2]], ids=["equal_lengths", "ragged"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_head_equals_the_logits_path(word_tokenizer, arch, response_lengths):
    """``logits=False`` (the chunked LM head) gives the log-probabilities, values, entropies and
    gradients of the logits path: same hidden states, same head, no [B, T, V] tensor."""
    from rlhf_cli.algo.functional import entropy_from_logits
    from rlhf_cli.ppo.head_logprobs import chunkable_lm_head

    policy = _tiny_llama(len(word_tokenizer)) if arch == "llama" else _policy(word_tokenizer)
    assert chunkable_lm_head(policy) is not None
    batch = _batch(response_lengths, len(word_tokenizer))
    real, weights = batch.response_mask.bool(), batch.response_mask.float()

    def loss_and_grads(out):
        loss = (out.logprobs * weights).sum() + (out.values * weights).sum()
        return torch.autograd.grad(loss, list(policy.parameters()))

    chunked = response_outputs(policy, batch, logits=False)
    straight = response_outputs(policy, batch)
    assert chunked.logits is None and torch.count_nonzero(chunked.logprobs[~real]) == 0
    assert (chunked.logprobs[real] <= 0).all()
    torch.testing.assert_close(chunked.logprobs[real], straight.logprobs[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.values[real], straight.values[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.entropy[real], entropy_from_logits(straight.logits)[real], atol=1e-5, rtol=1e-5)
    for grad, expected in zip(loss_and_grads(chunked), loss_and_grads(straight)):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("logits", [False, True], ids=["chunked_head", "logits_path"])
def test_rows_alone_equal_rows_together_in_float64(word_tokenizer, logits):
    """The 1-process and 2-process runs of the ``accumulation`` scenario feed the same rows in
    different groupings: one row alone (equal lengths: the positions by index) or two rows of
    different lengths together (a boolean mask). In float64, where rounding is ~1e-16, both give the
    same log-probabilities, entropies, values and gradients at every real token: a difference there
    (a padded position read, a chunk boundary off by one) is a bug, not rounding."""
    policy = _policy(word_tokenizer).double()
    lengths = [4, 1, 3, 2]
    batch = _batch(lengths, len(word_tokenizer))
    column_weights = torch.arange(1, batch.response_width + 1, dtype=torch.float64).cos()  # same per column alone or together

    def outputs_and_grads(rows):
        part = batch.select(rows)
        out = response_outputs(policy, part, logits=logits)
        entropy = out.entropy if out.entropy is not None else None
        mask = part.response_mask.double()
        loss = (out.logprobs * mask * column_weights[: part.response_width]).sum() + (out.values * mask).sum()
        grads = torch.autograd.grad(loss, list(policy.parameters()))
        real = [(out.logprobs[i, :n].detach(), out.values[i, :n].detach(), None if entropy is None else entropy[i, :n])
                for i, n in enumerate(part.response_lengths)]
        return real, grads

    together, grads_together = outputs_and_grads([0, 1, 2, 3])
    grads_alone = None
    for row in range(len(lengths)):
        (alone,), grads = outputs_and_grads([row])
        (logprobs, values, entropy), (logprobs_alone, values_alone, entropy_alone) = together[row], alone
        assert logprobs.dtype == torch.float64
        torch.testing.assert_close(logprobs, logprobs_alone, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(values, values_alone)  # float64 inside, handed out as float32 by design
        if entropy is not None:
            torch.testing.assert_close(entropy, entropy_alone, atol=1e-12, rtol=1e-12)
        grads_alone = grads if grads_alone is None else [a + g for a, g in zip(grads_alone, grads)]
    for got, expected in zip(grads_together, grads_alone):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
