"""Critic-free estimators (grpo, rloo, reinforce_pp) in PPOTrainer: no value head, groups, KL loss, learning."""

from __future__ import annotations

import pytest
import torch

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from tests.tiny import make_tiny_gpt2

CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")
G = 4
VALUE_STATS = ("ppo/loss/value", "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error",
               "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var", "ppo/val/var_explained")


def _trainer(word_tokenizer, estimator: str, **overrides) -> PPOTrainer:
    torch.manual_seed(0)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer))
    settings = dict(batch_size=8, mini_batch_size=4, samples_per_prompt=G, advantage_estimator=estimator,
                    learning_rate=3e-3, seed=0)
    settings.update(overrides)
    return PPOTrainer(PPOConfig(**settings), policy, tokenizer=word_tokenizer)


def _prompts(word_tokenizer) -> list[torch.Tensor]:
    return [torch.tensor(word_tokenizer.encode(text)) for text in ("the movie was", "this film is")]


def _grouped_batch(word_tokenizer, seed: int):
    """Two prompts × G responses, prompt-major; random responses and scores."""
    gen = torch.Generator().manual_seed(seed)
    queries = [q for q in _prompts(word_tokenizer) for _ in range(G)]
    responses = [torch.randint(3, len(word_tokenizer), (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen)
                 for _ in queries]
    scores = torch.randn(len(queries), generator=gen).tolist()
    return queries, responses, scores


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_the_value_head_is_neither_run_nor_trained(word_tokenizer, estimator):
    trainer = _trainer(word_tokenizer, estimator)
    model = trainer.accelerator.unwrap_model(trainer.model)
    head_before = {k: v.clone() for k, v in model.v_head.state_dict().items()}
    lm_before = model.pretrained_model.transformer.wte.weight.detach().clone()
    calls = []
    hook = model.v_head.register_forward_hook(lambda *args: calls.append(1))
    for step in range(2):
        stats = trainer.step(*_grouped_batch(word_tokenizer, step))
    hook.remove()
    assert calls == []  # not run: neither in the no-gradient pass nor in the mini-batches
    assert all(torch.equal(head_before[k], v) for k, v in model.v_head.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.v_head.parameters())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.v_head.parameters()}
    assert not torch.equal(lm_before, model.pretrained_model.transformer.wte.weight)  # the policy did train
    assert not set(VALUE_STATS) & set(stats)
    assert {"ppo/loss/policy", "ppo/loss/total", "ppo/policy/advantages_mean", "objective/kl"} <= set(stats)


def test_gae_keeps_its_value_head_and_stats(word_tokenizer):
    trainer = _trainer(word_tokenizer, "gae")
    model = trainer.accelerator.unwrap_model(trainer.model)
    head_before = model.v_head.summary.weight.detach().clone()
    stats = trainer.step(*_grouped_batch(word_tokenizer, 0))
    assert set(VALUE_STATS) <= set(stats)
    assert not torch.equal(head_before, model.v_head.summary.weight)


def test_gae_with_groups_equals_gae_on_the_same_samples_without(word_tokenizer):
    """samples_per_prompt only declares the layout to gae: the numbers are those of G = 1."""
    batch = _grouped_batch(word_tokenizer, 3)
    grouped = _trainer(word_tokenizer, "gae").step(*batch)
    plain = _trainer(word_tokenizer, "gae", samples_per_prompt=1).step(*batch)
    for key, value in plain.items():
        if not key.startswith("time/"):
            assert grouped[key] == pytest.approx(value, rel=0, abs=0), key


def test_kl_loss_term_is_in_the_total_loss_and_reported(word_tokenizer):
    trainer = _trainer(word_tokenizer, "grpo", kl_loss_coef=0.5, kl_in_reward=False, kl_loss_estimator="k3")
    for step in range(2):
        stats = trainer.step(*_grouped_batch(word_tokenizer, step))
    assert stats["objective/kl_loss_coef"] == 0.5
    assert stats["ppo/loss/kl"] > 0  # k3 is never negative, and the policy moved off the reference
    assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"] + 0.5 * stats["ppo/loss/kl"], rel=1e-5)
    # The reward-side penalty is off: β reported as 0, no non-score reward, the controller untouched.
    assert stats["objective/kl_coef"] == 0.0
    assert stats["ppo/mean_non_score_reward"] == 0.0
    assert trainer.kl_ctl.value == pytest.approx(0.2)


def test_without_a_kl_loss_no_kl_loss_stat_is_reported(word_tokenizer):
    stats = _trainer(word_tokenizer, "rloo").step(*_grouped_batch(word_tokenizer, 0))
    assert "ppo/loss/kl" not in stats and "objective/kl_loss_coef" not in stats
    assert stats["objective/kl_coef"] == pytest.approx(0.2)


def test_samples_that_are_not_prompt_major_are_refused(word_tokenizer):
    trainer = _trainer(word_tokenizer, "grpo")
    queries, responses, scores = _grouped_batch(word_tokenizer, 0)
    interleaved = [queries[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    with pytest.raises(ValueError, match=r"samples 0-3 should be the 4 responses to one prompt.*prompt-major"):
        trainer.step(interleaved, responses, scores)


@pytest.mark.parametrize("estimator", ("gae",) + CRITIC_FREE)
def test_rewarding_one_token_raises_its_probability(word_tokenizer, estimator):
    """A toy problem for each estimator: in every group half the responses are "great" (score 1) and
    half another token (score 0); "great" becomes more likely after the prompt."""
    trainer = _trainer(word_tokenizer, estimator, init_kl_coef=0.0, adap_kl_ctrl=False)
    great = word_tokenizer.convert_tokens_to_ids("great")
    prompts = _prompts(word_tokenizer)

    def p_great() -> float:
        with torch.no_grad():
            logits, _, _ = trainer.model(input_ids=prompts[0].unsqueeze(0))
        return float(torch.softmax(logits[0, -1], -1)[great])

    before = p_great()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(3, len(word_tokenizer), (2 * G,), generator=gen)
        tokens[tokens == great] = great + 1
        tokens[0::2] = great  # two of each group's four responses
        queries = [q for q in prompts for _ in range(G)]
        scores = [1.0 if int(t) == great else 0.0 for t in tokens]
        trainer.step(queries, [t.reshape(1) for t in tokens], scores)
    assert p_great() > 2 * before
