"""What TRL 0.11's step(), loss() and generate() give a caller (issue 24): the stats TRL returns (flattened
advantages, length distributions, the stats' own time), its score-shape rule, loss() on TRL's own
test shapes, and the user's eos_token_id reaching model.generate."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.algo.functional import entropy_from_logits
from tests.tiny import make_tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = [torch.tensor([3, 4, 5]), torch.tensor([6]), torch.tensor([7, 8])]
RESPONSES = [torch.tensor([9, 10]), torch.tensor([11, 12, 13, 14]), torch.tensor([15])]


def make_trainer(tokenizer, **config):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PPOTrainer(PPOConfig(**{"batch_size": 3, "mini_batch_size": 3, "ppo_epochs": 1, **config}), policy, tokenizer=tokenizer)


def test_step_returns_trls_arrays_and_timings(word_tokenizer):
    trainer = make_trainer(word_tokenizer)
    stats = trainer.step(QUERIES, RESPONSES, [1.0, -0.5, 0.25])
    advantages = stats["ppo/policy/advantages"]
    # One advantage per response token of the batch; one mini-batch of the whole batch in one epoch,
    # so its masked mean is the reported mean.
    assert isinstance(advantages, np.ndarray) and advantages.shape == (sum(len(r) for r in RESPONSES),)
    assert float(advantages.mean()) == pytest.approx(stats["ppo/policy/advantages_mean"], abs=1e-6)
    np.testing.assert_array_equal(stats["tokens/queries_dist"], [len(q) for q in QUERIES])
    np.testing.assert_array_equal(stats["tokens/responses_dist"], [len(r) for r in RESPONSES])
    phases = ("forward_pass", "compute_rewards", "compute_advantages", "optimize_step", "calc_stats")
    assert all(stats[f"time/ppo/{phase}"] > 0 for phase in phases)
    assert stats["time/ppo/total"] >= sum(stats[f"time/ppo/{phase}"] for phase in phases)


@pytest.mark.parametrize("shape", [(1, 1), (2,)], ids=["2-d", "two-elements"])
def test_step_refuses_a_score_that_is_not_one_number(word_tokenizer, shape):
    trainer = make_trainer(word_tokenizer)
    with pytest.raises(ValueError, match=r"scores\[0\] must be a scalar"):
        trainer.step(QUERIES, RESPONSES, [torch.ones(shape), torch.tensor(0.0), torch.tensor(1.0)])
    trainer.step(QUERIES, RESPONSES, [torch.tensor([1.0]), torch.tensor(0.0), torch.tensor([1.0])])  # TRL squeezes 1-d


def test_loss_takes_probabilities_shaped_like_the_mask_as_trls_test_passes_them(word_tokenizer):
    """TRL's test_loss_trainer hands loss() exp(logprobs) [1, L] as "logits": TRL's masked mean
    broadcasts the resulting entropy [1] against the mask, and so does ours."""
    trainer = make_trainer(word_tokenizer)
    inputs = trainer.prepare_model_inputs(QUERIES[:1], RESPONSES[:1])
    with torch.no_grad():
        logprobs, _, values, mask = trainer.batched_forward_pass(trainer.model, QUERIES[:1], RESPONSES[:1], inputs)
    advantages, returns = torch.randn_like(values) * mask, values + 0.5
    probabilities = torch.exp(logprobs)
    _, _, stats = trainer.loss(logprobs, values, probabilities, values + 0.1, logprobs + 0.01, mask, advantages, returns)
    expected = entropy_from_logits(probabilities)  # [1]: one "distribution" over the row
    assert float(stats["policy/entropy"]) == pytest.approx(float(expected[0]), rel=1e-6)
    # With real logits [B, T, V] the entropy stays per token.
    logits = torch.randn(*mask.shape, 7)
    _, _, stats = trainer.loss(logprobs, values, logits, values, logprobs, mask, advantages, returns)
    per_token = entropy_from_logits(logits)
    assert float(stats["policy/entropy"]) == pytest.approx(float(per_token[mask.bool()].mean()), rel=1e-6)


def test_the_users_eos_token_id_goes_to_generate(word_tokenizer):
    """Greedy generation stops right after the token the caller named as EOS; -1 never stops."""
    trainer = make_trainer(word_tokenizer, batch_size=1, mini_batch_size=1)
    query = torch.tensor([3, 4, 5])
    greedy = {"do_sample": False, "max_new_tokens": 6, "min_length": -1}
    free = trainer.generate(query, return_prompt=False, remove_padding=False, eos_token_id=-1, **greedy)[0]
    assert len(free) == 6
    stop = int(free[2])
    first = int((free == stop).nonzero()[0])
    stopped = trainer.generate(query, return_prompt=False, remove_padding=False, eos_token_id=stop, **greedy)[0]
    assert stopped.tolist() == free[: first + 1].tolist()
    batched = trainer._generate_batched(trainer.model, [query], return_prompt=False, remove_padding=False, eos_token_id=stop, **greedy)
    assert batched[0].tolist() == stopped.tolist()
