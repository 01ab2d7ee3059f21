"""PPOTrainer on tiny models built from config: API, padding invariance, determinism, learning."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.core import logprobs_from_logits
from rlhf_cli.models import disable_dropout
from rlhf_cli.ppo.forward import score_rollout
from rlhf_cli.rollout.packing import pack_batch
from tests.tiny import make_tiny_gpt2, make_tiny_t5
from tests.tolerances import assert_same_update

STAT_KEYS = {
    "objective/kl", "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "objective/kl_coef",
    "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores", "ppo/std_scores",
    "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/responses_len_mean", "tokens/responses_len_std",
    "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
    "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages_mean", "ppo/policy/ratio",
    "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean",
    "ppo/val/var", "ppo/val/var_explained", "ppo/learning_rate", "time/ppo/total",
}


def _policy(word_tokenizer, seed: int = 0):
    return AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, seed=seed))


def _ragged_batch(n: int, seed: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    queries = [torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    scores = [torch.tensor(float(s)) for s in torch.randn(n, generator=gen)]
    return queries, responses, scores


def test_seed_readme_example_runs_with_rlhf_cli(tiny_gpt2_dir):
    """The seed README's example, `trl` -> `rlhf_cli` and `gpt2` -> a local tiny GPT-2, unchanged otherwise."""
    from transformers import AutoTokenizer

    from rlhf_cli import PPOConfig, PPOTrainer, AutoModelForCausalLMWithValueHead, create_reference_model
    from rlhf_cli.core import respond_to_batch

    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tiny_gpt2_dir))
    model_ref = create_reference_model(model)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    ppo_config = PPOConfig(batch_size=1)
    query_txt = "This morning I went to the "
    query_tensor = tokenizer.encode(query_txt, return_tensors="pt")
    response_tensor = respond_to_batch(model, query_tensor)
    ppo_trainer = PPOTrainer(ppo_config, model, model_ref, tokenizer)
    reward = [torch.tensor(1.0)]
    train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)

    assert response_tensor.shape == (1, 20)
    assert ppo_config.mini_batch_size == 1
    assert STAT_KEYS <= set(train_stats)
    assert all(math.isfinite(train_stats[k]) for k in STAT_KEYS if isinstance(train_stats[k], float))
    assert train_stats["ppo/mean_scores"] == pytest.approx(1.0)
    assert train_stats["tokens/responses_len_mean"] == 20


def test_stats_match_unpadded_per_sample_forward(word_tokenizer):
    """objective/kl and logprobs from the packed batch equal one unpadded forward pass per sample."""
    torch.manual_seed(0)
    policy = _policy(word_tokenizer)
    trainer = PPOTrainer(PPOConfig(batch_size=5, mini_batch_size=5, ppo_epochs=1, learning_rate=1e-3), policy, tokenizer=word_tokenizer)
    # Make the reference differ from the policy so the KL is not trivially zero.
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    queries, responses, scores = _ragged_batch(5, seed=1, vocab=len(word_tokenizer))

    def sample_logprobs(model, q, r):
        ids = torch.cat([q, r]).unsqueeze(0)
        with torch.no_grad():
            logits, _, values = model(input_ids=ids)
        return logprobs_from_logits(logits[0, len(q) - 1 : -1], r), values[0, len(q) - 1 : -1]

    expected_kl = []
    for q, r in zip(queries, responses):
        lp, _ = sample_logprobs(trainer.model, q, r)
        ref_lp, _ = sample_logprobs(trainer.ref_model, q, r)
        expected_kl.append(float((lp - ref_lp).sum()))
    stats = trainer.step(queries, responses, scores)
    assert stats["objective/kl"] == pytest.approx(sum(expected_kl) / 5, abs=1e-5)
    assert stats["objective/kl_dist"] == pytest.approx(expected_kl, abs=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_invariance(word_tokenizer, padding_side):
    """A sample gets the same logprobs and values next to longer neighbours, whatever the padding side."""
    word_tokenizer.padding_side = padding_side
    policy = _policy(word_tokenizer)
    reference = _policy(word_tokenizer, seed=1)
    disable_dropout(policy)  # the value head's dropout would make two passes differ
    disable_dropout(reference)
    queries, responses, _ = _ragged_batch(6, seed=2, vocab=len(word_tokenizer))
    alone = pack_batch(queries[:1], responses[:1], pad_token_id=0, is_encoder_decoder=False)
    together = pack_batch(queries, responses, pad_token_id=0, is_encoder_decoder=False)
    a = score_rollout(policy, reference, alone, chunk_size=1, need_full_kl=True)
    b = score_rollout(policy, reference, together, chunk_size=6, need_full_kl=True)
    n = len(responses[0])
    for field in ("logprobs", "values", "ref_logprobs", "full_kl"):
        torch.testing.assert_close(getattr(a, field)[0, :n], getattr(b, field)[0, :n], atol=1e-5, rtol=1e-5)
    word_tokenizer.padding_side = "left"


def test_step_stats_do_not_depend_on_tokenizer_padding_side(word_tokenizer):
    results = []
    for side in ("left", "right"):
        word_tokenizer.padding_side = side
        policy = _policy(word_tokenizer)
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, seed=3), policy, tokenizer=word_tokenizer)
        results.append(trainer.step(*_ragged_batch(4, seed=4, vocab=len(word_tokenizer))))
    word_tokenizer.padding_side = "left"
    for key in STAT_KEYS - {"time/ppo/total"}:
        if isinstance(results[0][key], float):
            assert results[0][key] == pytest.approx(results[1][key], abs=1e-5), key


def test_same_seed_same_stats_and_weights(word_tokenizer):
    def run():
        policy = _policy(word_tokenizer)
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, seed=7, learning_rate=1e-3), policy, tokenizer=word_tokenizer)
        stats = [trainer.step(*_ragged_batch(4, seed=s, vocab=len(word_tokenizer))) for s in (5, 6)]
        return stats, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    stats_a, weights_a = run()
    stats_b, weights_b = run()
    for sa, sb in zip(stats_a, stats_b):
        for key, value in sa.items():
            if key.startswith("time/"):
                continue
            if isinstance(value, float):
                assert value == sb[key] or (math.isnan(value) and math.isnan(sb[key])), key
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def test_positive_score_for_one_token_raises_its_probability(word_tokenizer):
    """A toy problem: rewarding responses that are the token "great" makes "great" more likely."""
    torch.manual_seed(0)
    policy = _policy(word_tokenizer)
    trainer = PPOTrainer(
        PPOConfig(batch_size=8, mini_batch_size=4, learning_rate=3e-3, init_kl_coef=0.0, adap_kl_ctrl=False, seed=0),
        policy,
        tokenizer=word_tokenizer,
    )
    great = word_tokenizer.convert_tokens_to_ids("great")
    query = torch.tensor(word_tokenizer.encode("the movie was"))

    def p_great():
        with torch.no_grad():
            logits, _, _ = trainer.model(input_ids=query.unsqueeze(0))
        return float(torch.softmax(logits[0, -1], -1)[great])

    before = p_great()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(3, len(word_tokenizer), (8,), generator=gen)
        tokens[:4] = great  # half the batch says "great" and is rewarded, the rest is not
        responses = [t.reshape(1) for t in tokens]
        scores = [1.0 if int(t) == great else -1.0 for t in tokens]
        trainer.step([query] * 8, responses, scores)
    assert p_great() > 2 * before


def test_seq2seq_step(word_tokenizer):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(make_tiny_t5(word_tokenizer))
    trainer = PPOTrainer(PPOConfig(batch_size=3, mini_batch_size=3, ppo_epochs=2), model, tokenizer=word_tokenizer)
    queries, responses, scores = _ragged_batch(3, seed=8, vocab=len(word_tokenizer))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.step(queries, responses, scores)
    assert STAT_KEYS <= set(stats)
    assert math.isfinite(stats["ppo/loss/total"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    generated = trainer.generate(queries, batch_size=2, max_new_tokens=4, do_sample=True)
    assert len(generated) == 3 and all(1 <= len(g) <= 4 for g in generated)


def test_generate_single_and_batched(word_tokenizer):
    policy = _policy(word_tokenizer)
    trainer = PPOTrainer(PPOConfig(batch_size=2), policy, tokenizer=word_tokenizer)
    query = torch.tensor(word_tokenizer.encode("the movie was"))
    single = trainer.generate(query, max_new_tokens=5, do_sample=True, return_prompt=True)
    assert single.dim() == 2 and torch.equal(single[0, : len(query)], query)
    batched = trainer.generate([query, query[:1]], batch_size=2, return_prompt=False, max_new_tokens=6, do_sample=True)
    assert len(batched) == 2 and all(1 <= len(r) <= 6 for r in batched)
    # Each response stops right after its first EOS.
    for r in batched:
        eos = (r == word_tokenizer.eos_token_id).nonzero()
        assert eos.numel() == 0 or int(eos[0]) == len(r) - 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, r, s: (q[:-1], r, s), "queries has 2 entries but responses has 3"),
        (lambda q, r, s: (q[:2], r[:2], s[:2]), "batch has 3"),
        (lambda q, r, s: (q, r, s[:2]), "scores has 2 entries"),
        (lambda q, r, s: (q, r, [torch.ones(2)] + s[1:]), "scores[0] must be a scalar"),
        (lambda q, r, s: (q, r, s[:2] + [float("nan")]), "scores[2] is nan"),
        (lambda q, r, s: (q, [torch.tensor([], dtype=torch.long)] + r[1:], s), "responses[0] is empty"),
        (lambda q, r, s: (q, r, ["good"] + s[1:]), "scores[0] must be a number"),
        (lambda q, r, s: ([x.float() for x in q], r, s), "integer token ids"),
    ],
)
def test_bad_step_input_is_named(word_tokenizer, mutate, message):
    trainer = PPOTrainer(PPOConfig(batch_size=3), _policy(word_tokenizer), tokenizer=word_tokenizer)
    queries, responses, scores = _ragged_batch(3, seed=9, vocab=len(word_tokenizer))
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        trainer.step(*mutate(queries, responses, scores))


def test_config_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by mini_batch_size × gradient_accumulation_steps = 4 × 1 = 4"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    assert PPOConfig(batch_size=256).mini_batch_size == 128
    assert PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2).backward_batch_size == 4


def test_gradient_accumulation_matches_one_big_minibatch(word_tokenizer):
    """mini-batch 2 × accumulation 2 takes the same optimiser steps as mini-batch 4 when the losses
    are means over equal token counts (all responses the same length here)."""

    def run(mini, accum):
        policy = _policy(word_tokenizer)
        config = PPOConfig(batch_size=4, mini_batch_size=mini, gradient_accumulation_steps=accum, ppo_epochs=1, learning_rate=1e-2, seed=0)
        # Plain SGD: Adam's normalisation would turn float noise in near-zero gradients into
        # full-size steps and hide a wrong gradient scale.
        sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
        trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer, optimizer=sgd)
        gen = torch.Generator().manual_seed(3)
        queries = [torch.randint(3, 40, (3,), generator=gen) for _ in range(4)]
        responses = [torch.randint(3, 40, (4,), generator=gen) for _ in range(4)]
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.step(queries, responses, [1.0, -1.0, 0.5, 0.0])
        return initial, trainer.model.state_dict()

    (initial, a), (_, b) = run(4, 1), run(2, 2)
    # Two half-batch gradients summed vs one whole-batch gradient: equal up to summation order,
    # compared relative to the update's size (tests/tolerances.py says why and how much).
    assert_same_update(initial, a, b, what="accumulation 2 × 2 vs 4 × 1")


def test_ratio_threshold_zeroes_the_update(word_tokenizer):
    policy = _policy(word_tokenizer)
    # A threshold below 1 trips on every mini-batch: nothing may change.
    trainer = PPOTrainer(PPOConfig(batch_size=2, ratio_threshold=0.5, learning_rate=1e-2), policy, tokenizer=word_tokenizer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.warns(UserWarning, match="ratio_threshold"):
        stats = trainer.step(*_ragged_batch(2, seed=11, vocab=len(word_tokenizer)))
    assert stats["ppo/loss/total"] == 0.0
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(before[key], value), key


def test_early_stopping_stops_epochs(word_tokenizer):
    policy = _policy(word_tokenizer)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=4, learning_rate=0.5, early_stopping=True, target_kl=1e-6)
    trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer)
    stats = trainer.step(*_ragged_batch(4, seed=12, vocab=len(word_tokenizer)))
    assert stats["ppo/minibatches"] < 4 * 2


def test_adaptive_kl_coefficient_moves_after_step(word_tokenizer):
    policy = _policy(word_tokenizer)
    trainer = PPOTrainer(PPOConfig(batch_size=2, init_kl_coef=0.2, target=6.0, horizon=100.0), policy, tokenizer=word_tokenizer)
    stats = trainer.step(*_ragged_batch(2, seed=13, vocab=len(word_tokenizer)))
    error = max(-0.2, min(0.2, stats["objective/kl"] / 6.0 - 1))
    assert stats["objective/kl_coef"] == 0.2
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 + error * 2 / 100.0))


def test_score_scaling_and_clipping_change_mean_scores(word_tokenizer):
    policy = _policy(word_tokenizer)
    config = PPOConfig(batch_size=3, use_score_scaling=True, use_score_norm=True, score_clip=0.5)
    trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer)
    queries, responses, _ = _ragged_batch(3, seed=14, vocab=len(word_tokenizer))
    stats = trainer.step(queries, responses, [10.0, 20.0, 30.0])
    # Running mean 20 and std 10 after the first update: normalised (-1, 0, 1), clipped to ±0.5.
    assert stats["ppo/mean_scores"] == pytest.approx(0.0, abs=1e-6)
    assert stats["ppo/std_scores"] == pytest.approx(0.5, abs=1e-5)


def test_peft_policy_uses_itself_without_adapter_as_reference(word_tokenizer):
    """With LoRA, ref_model=None means the policy with its adapter disabled: no second model, and
    reference logprobs equal the base model's."""
    peft = pytest.importorskip("peft")
    base = make_tiny_gpt2(word_tokenizer)
    base_copy = make_tiny_gpt2(word_tokenizer)  # same seed: same weights, for the expected numbers
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(lora)
    trainer = PPOTrainer(PPOConfig(batch_size=2, learning_rate=1e-2), policy, tokenizer=word_tokenizer)
    assert trainer.ref_model is None

    queries, responses, scores = _ragged_batch(2, seed=15, vocab=len(word_tokenizer))
    batch = pack_batch(queries, responses, pad_token_id=0, is_encoder_decoder=False)
    rollout = score_rollout(trainer.model, trainer.reference_context, batch, chunk_size=2, need_full_kl=False)
    expected = AutoModelForCausalLMWithValueHead.from_pretrained(base_copy)
    disable_dropout(expected)
    expected_rollout = score_rollout(expected, expected, batch, chunk_size=2, need_full_kl=False)
    torch.testing.assert_close(rollout.ref_logprobs, expected_rollout.logprobs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rollout.logprobs, rollout.ref_logprobs)  # the adapter does change the policy

    frozen = {k: v.clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    trainer.step(queries, responses, scores)
    for name, value in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(frozen[name], value), f"base weight {name} changed"
    assert all("lora" in n or "v_head" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_step_keeps_the_raw_scores_it_gathered_once(word_tokenizer):
    """The engine reads env/reward_* from trainer.gathered_scores: the raw (unscaled, unclipped) scores
    of the global batch, while the step itself uses the processed ones (ppo/mean_scores)."""
    config = PPOConfig(batch_size=4, mini_batch_size=2, use_score_scaling=True, score_clip=0.5, seed=0)
    trainer = PPOTrainer(config, _policy(word_tokenizer), tokenizer=word_tokenizer)
    queries, responses, _ = _ragged_batch(4, seed=3, vocab=len(word_tokenizer))
    raw = torch.tensor([3.0, -2.0, 0.25, 1.5], dtype=torch.float64)
    stats = trainer.step(queries, responses, raw)
    torch.testing.assert_close(trainer.gathered_scores.cpu(), raw.float(), rtol=0, atol=0)
    assert abs(stats["ppo/mean_scores"] - float(raw.float().mean())) > 0.1  # processed, not raw
    raw[0] = 100.0  # the trainer keeps its own copy, not a view of the caller's tensor
    assert float(trainer.gathered_scores[0]) == 3.0


def test_tensor_scores_are_checked_like_a_list_of_scores():
    """check_scores converts a tensor in one transfer, to the same float32 values and errors as a list."""
    from rlhf_cli.ppo.inputs import check_scores

    values = torch.tensor([0.1, -1e-3, 7.25, 1 / 3], dtype=torch.float64)
    as_list = check_scores([torch.tensor(float(v), dtype=torch.float64) for v in values], 4)
    torch.testing.assert_close(check_scores(values, 4), as_list, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"scores\[2\] is nan: scores must be finite numbers"):
        check_scores(torch.tensor([0.0, 1.0, float("nan"), 2.0]), 4)
    with pytest.raises(ValueError, match=r"scores has 1 entries but the batch has 4"):
        check_scores(torch.tensor(1.0), 4)
