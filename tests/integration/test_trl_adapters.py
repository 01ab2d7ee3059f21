"""TRL 0.11's protected PPOTrainer methods (issue 10, point 6): each gives what our internal path gives
on the same inputs, with TRL's signature, shapes and return types."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.core import logprobs_from_logits
from rlhf_cli.algo import functional, kl
from rlhf_cli.ppo.forward import response_outputs
from rlhf_cli.ppo.minibatch import ratio_threshold_warning
from rlhf_cli.rollout.packing import pack_batch
from tests.tiny import make_tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = [torch.tensor([3, 4, 5]), torch.tensor([6]), torch.tensor([7, 8])]
RESPONSES = [torch.tensor([9, 10]), torch.tensor([11, 12, 13, 14]), torch.tensor([15])]


def make_trainer(tokenizer, **config):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PPOTrainer(PPOConfig(**{"batch_size": 3, "mini_batch_size": 3, **config}), policy, tokenizer=tokenizer)


def internal(trainer, queries=QUERIES, responses=RESPONSES):
    batch = pack_batch(queries, responses, pad_token_id=trainer.pad_token_id, is_encoder_decoder=False,
                       device=trainer.accelerator.device)  # where prepare_model_inputs puts its tensors (a GPU, on one)
    with torch.no_grad():
        return batch, response_outputs(trainer.model, batch)


def test_prepare_model_inputs_is_steps_packing(word_tokenizer):
    trainer = make_trainer(word_tokenizer)
    inputs = trainer.prepare_model_inputs(QUERIES, RESPONSES)
    batch, _ = internal(trainer)
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    for key, value in batch.model_inputs().items():
        assert torch.equal(inputs[key], value), key


@pytest.mark.parametrize("layout", ["ours", "trl_right_padded"])
def test_batched_forward_pass_is_aligned_as_trl_and_equals_our_forward(word_tokenizer, layout):
    trainer = make_trainer(word_tokenizer, mini_batch_size=1)  # TRL chunks by mini_batch_size
    if layout == "ours":
        inputs = trainer.prepare_model_inputs(QUERIES, RESPONSES)
    else:  # what TRL's own prepare_model_inputs builds: concat(q, r), right-padded
        rows = [torch.cat([q, r]) for q, r in zip(QUERIES, RESPONSES)]
        width = max(len(r) for r in rows)
        inputs = {
            "input_ids": torch.stack([F.pad(r, (0, width - len(r))) for r in rows]),
            "attention_mask": torch.stack([F.pad(torch.ones_like(r), (0, width - len(r))) for r in rows]),
        }
    with torch.no_grad():
        logprobs, logits, values, masks = trainer.batched_forward_pass(trainer.model, QUERIES, RESPONSES, inputs, return_logits=True)
    width = inputs["input_ids"].shape[1] - 1
    assert logprobs.shape == values.shape == masks.shape == (3, width) and logits.shape[:2] == (3, width)
    batch, ours = internal(trainer)
    left_pad = inputs["attention_mask"].argmax(dim=1)
    for i, (q, r) in enumerate(zip(QUERIES, RESPONSES)):
        start = int(left_pad[i]) + len(q) - 1  # TRL: position j predicts token j + 1
        assert masks[i].tolist() == [0] * start + [1] * len(r) + [0] * (width - start - len(r))
        span = slice(start, start + len(r))
        # (chunks of 1 here vs the whole batch there: kernels differ in the last bits)
        torch.testing.assert_close(logprobs[i, span], ours.logprobs[i, : len(r)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values[i, span], ours.values[i, : len(r)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits[i, span], ours.logits[i, : len(r)], rtol=1e-6, atol=1e-6)
        # ... and what one unpadded forward of the sample alone gives, read at TRL's positions.
        alone_logits, _, alone_values = trainer.model(input_ids=torch.cat([q, r])[None])
        alone = logprobs_from_logits(alone_logits[:, :-1], torch.cat([q, r])[None, 1:])[0]
        torch.testing.assert_close(logprobs[i, span], alone[len(q) - 1 :], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i, span], alone_values[0, len(q) - 1 : -1], atol=1e-5, rtol=1e-5)


def test_batched_forward_pass_applies_response_masks(word_tokenizer):
    trainer = make_trainer(word_tokenizer)
    inputs = trainer.prepare_model_inputs(QUERIES, RESPONSES)
    response_masks = [torch.tensor([1, 0]), torch.tensor([0, 1, 1, 0]), torch.tensor([1])]
    with torch.no_grad():
        _, _, _, masks = trainer.batched_forward_pass(trainer.model, QUERIES, RESPONSES, inputs, response_masks=response_masks)
    assert masks.sum(dim=1).tolist() == [1, 2, 1]


@pytest.mark.parametrize("mode", ["kl", "abs", "mse", "full"])
def test_kl_penalty_every_mode(word_tokenizer, mode):
    trainer = make_trainer(word_tokenizer, kl_penalty=mode)
    gen = torch.Generator().manual_seed(0)
    if mode == "full":
        logits, ref_logits = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)  # what TRL passes in "full" mode
        got = trainer._kl_penalty(logp, ref_logp)
        torch.testing.assert_close(got, kl.full_kl(logits, ref_logits))
        torch.testing.assert_close(got, F.kl_div(ref_logp, logp, log_target=True, reduction="none").sum(-1))  # TRL's formula
    else:
        logp, ref_logp = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
        torch.testing.assert_close(trainer._kl_penalty(logp, ref_logp), kl.kl_penalty(logp, ref_logp, mode), rtol=0, atol=0)


def test_compute_rewards_and_advantages_equal_the_functional_path(word_tokenizer):
    trainer = make_trainer(word_tokenizer, whiten_rewards=True, gamma=0.9, lam=0.8)
    trainer.kl_ctl.value = 0.3
    gen = torch.Generator().manual_seed(1)
    logp, ref_logp, values = (torch.randn(3, 4, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    scores = [torch.tensor(1.0), torch.tensor(-0.5), torch.tensor(2.0)]
    rewards, non_score, kls = trainer.compute_rewards(scores, logp, ref_logp, mask)
    expected = functional.per_token_rewards(torch.tensor([1.0, -0.5, 2.0]), logp - ref_logp, mask, 0.3)
    torch.testing.assert_close(rewards, expected.rewards, rtol=0, atol=0)
    torch.testing.assert_close(non_score, expected.non_score_rewards, rtol=0, atol=0)
    torch.testing.assert_close(kls, logp - ref_logp, rtol=0, atol=0)

    masked_values, advantages, returns = trainer.compute_advantages(values, rewards, mask)
    reference = functional.gae(values, rewards, mask, 0.9, 0.8, whiten_rewards=True)
    torch.testing.assert_close(advantages, reference.advantages, rtol=0, atol=0)
    torch.testing.assert_close(returns, reference.returns, rtol=0, atol=0)
    torch.testing.assert_close(masked_values, values * mask, rtol=0, atol=0)


def test_loss_equals_the_functional_losses_and_reports_trl_stats(word_tokenizer):
    trainer = make_trainer(word_tokenizer, cliprange=0.1, cliprange_value=0.3, vf_coef=0.5)
    gen = torch.Generator().manual_seed(2)
    old_logp, values, logp, vpreds, advantages, returns = (torch.randn(3, 4, generator=gen) * 0.3 for _ in range(6))
    logits = torch.randn(3, 4, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    pg, vf, stats = trainer.loss(old_logp, values, logits, vpreds, logp, mask, advantages, returns)
    policy = functional.policy_loss(logp, old_logp, advantages, mask, 0.1)
    value = functional.value_loss(vpreds, values, returns, mask, 0.3)
    torch.testing.assert_close(pg, policy.loss, rtol=0, atol=0)
    torch.testing.assert_close(vf, 0.5 * value.loss, rtol=0, atol=0)
    torch.testing.assert_close(stats["loss/total"], policy.loss + 0.5 * value.loss)
    for key, expected in {
        "policy/clipfrac": policy.clipfrac, "policy/approxkl": policy.approxkl, "policy/policykl": policy.policykl,
        "val/clipfrac": value.clipfrac, "val/vpred": value.vpred_mean, "val/error": value.error,
        "policy/entropy": functional.masked_mean(functional.entropy_from_logits(logits), mask),
        "returns/var": functional.masked_var(returns, mask),
    }.items():
        torch.testing.assert_close(stats[key], expected, rtol=0, atol=0, msg=key)

    tight = make_trainer(word_tokenizer, ratio_threshold=0.5)
    with pytest.warns(UserWarning, match="ratio_threshold") as caught:
        pg, vf, stats = tight.loss(old_logp, values, logits, vpreds, logp, mask, advantages, returns)
    assert float(pg) == float(vf) == float(stats["loss/total"]) == 0.0
    # Worded once, with the engine's step warning (issue 21).
    assert str(caught[0].message) == ratio_threshold_warning(0.5, 1, tight.current_step, float(stats["policy/ratio"]))


def test_record_step_stats_follows_trl_formulas(word_tokenizer):
    trainer = make_trainer(word_tokenizer)
    gen = torch.Generator().manual_seed(3)
    logp, ref_logp, non_score, kls = (torch.randn(3, 4, generator=gen) for _ in range(4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    scores = torch.tensor([1.0, 2.0, 4.0])
    train_stats = {"loss/policy": torch.tensor([0.5, 1.5]), "val/error": torch.tensor([2.0, 4.0]), "returns/var": torch.tensor([6.0, 6.0])}
    stats = trainer.record_step_stats(
        kl_coef=0.2, scores=scores, logprobs=logp, ref_logprobs=ref_logp, non_score_reward=non_score,
        train_stats=train_stats, masks=mask, queries=QUERIES, responses=RESPONSES, kls=kls,
    )
    assert stats["objective/kl"] == pytest.approx(float((kls * mask).sum(-1).mean()))
    assert stats["objective/entropy"] == pytest.approx(float((-logp * mask).sum(-1).mean()))
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(float((non_score * mask).sum() / mask.sum()))
    assert (stats["ppo/mean_scores"], stats["ppo/std_scores"]) == (pytest.approx(7 / 3), pytest.approx(float(scores.std())))
    assert stats["tokens/responses_len_mean"] == pytest.approx(7 / 3)
    assert stats["objective/kl_coef"] == 0.2
    assert float(stats["ppo/loss/policy"]) == pytest.approx(1.0)
    assert float(stats["ppo/val/var_explained"]) == pytest.approx(1 - 3.0 / 6.0)


def test_step_safety_checker_is_steps_input_check(word_tokenizer):
    trainer = make_trainer(word_tokenizer)
    queries, responses, scores, masks = trainer._step_safety_checker(3, QUERIES, RESPONSES, [torch.tensor(1.0), 2.0, torch.tensor([3.0])])
    assert [s.dim() for s in scores] == [0, 0, 0] and [float(s) for s in scores] == [1.0, 2.0, 3.0]
    assert all(q.device == trainer.current_device for q in queries) and masks is None
    with pytest.raises(ValueError, match="queries has 3 entries but the batch has 2"):
        trainer._step_safety_checker(2, QUERIES, RESPONSES, [1.0, 2.0, 3.0])


def test_core_logprobs_from_logits_takes_trls_gather_flag():
    from rlhf_cli.core import logprobs_from_logits as core_logprobs

    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([[0, 1, 2], [3, 4, 5]])
    torch.testing.assert_close(core_logprobs(logits, labels), functional.logprobs_from_logits(logits, labels), rtol=0, atol=0)
    full = core_logprobs(logits, None, gather=False)
    assert full.shape == (2, 3, 7)
    torch.testing.assert_close(full.gather(-1, labels[..., None])[..., 0], core_logprobs(logits, labels))
