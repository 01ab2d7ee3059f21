"""Reward-model training (issue 19): a planted preference is learned, and the learned-reward option
scores exactly as the trained model's forward does."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from rlhf_cli.data.preferences import PreferenceRows
from rlhf_cli.reward_model.data import tokenize_pairs
from rlhf_cli.engine.export import save_final
from rlhf_cli.models import AutoModelForCausalLMWithValueHead
from rlhf_cli.reward_model.evaluate import score_model_on_pairs
from rlhf_cli.reward_model.scoring import ScoringRule, left_padded, sequence_scores
from rlhf_cli.reward_model.trainer import RewardModelTrainer
from rlhf_cli.rewards import build_reward
from tests.tiny import WORDS, make_tiny_gpt2

MARKER = "wonderful"
FILLER = [w for w in WORDS if w not in (MARKER, ".", ",", "!", "?")]


def _planted_rows(count: int, seed: int) -> PreferenceRows:
    """chosen: a random sentence with the marker word somewhere in it; rejected: one without."""
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(count):
        prompt = " ".join(rng.choices(FILLER, k=3))
        good = rng.choices(FILLER, k=6)
        good.insert(rng.randrange(len(good) + 1), MARKER)
        prompts.append(prompt)
        chosen.append(" " + " ".join(good))
        rejected.append(" " + " ".join(rng.choices(FILLER, k=7)))
    return PreferenceRows(prompts, chosen, list(prompts), rejected)


@pytest.fixture
def reward_model(word_tokenizer):
    torch.manual_seed(0)
    return AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, n_layer=1, n_embd=32, n_head=2))


def test_a_planted_preference_is_learned(word_tokenizer, reward_model, one_thread):
    train = tokenize_pairs(_planted_rows(512, seed=0), word_tokenizer, 64)
    heldout = tokenize_pairs(_planted_rows(200, seed=1), word_tokenizer, 64)
    trainer = RewardModelTrainer(reward_model, word_tokenizer, train, learning_rate=3e-3, batch_size=16,
                                 accelerator=Accelerator(cpu=True))
    for epoch in range(2):
        for batch in range(trainer.batches_per_epoch):
            trainer.step(epoch, batch)
    result = score_model_on_pairs("learned", trainer.unwrapped_model, word_tokenizer, heldout, batch_size=64, device="cpu")
    assert result.accuracy >= 0.95, result.line()


def test_learned_reward_option_scores_like_the_model_forward(word_tokenizer, reward_model, tmp_path):
    run_dir = tmp_path / "rm"
    save_final(reward_model, word_tokenizer, run_dir / "final")
    ScoringRule(max_length=5).save(run_dir / "final")
    reward = build_reward(OmegaConf.create({"type": "learned", "model": str(run_dir), "batch_size": 3, "device": "cpu",
                                            "components": []}))
    prompts = ["the movie", "a film that", "i"]
    responses = [" was good", " was really really bad and boring", " loved it"]
    scores = reward(prompts, responses)
    reward_model.eval()
    for prompt, response, score in zip(prompts, responses, scores):
        ids = word_tokenizer(prompt + response, add_special_tokens=False)["input_ids"][-5:]  # the rule: last 5 tokens
        with torch.no_grad():
            alone = sequence_scores(reward_model, left_padded([ids], word_tokenizer.pad_token_id)).item()
        assert score == pytest.approx(alone, abs=1e-5)
    probability = reward.preference_probability(prompts[:1], responses[:1], responses[1:2])[0]
    assert probability == pytest.approx(float(torch.sigmoid(torch.tensor(scores[0] - scores[1]))), abs=1e-6)


def test_learned_reward_refuses_a_path_that_is_not_a_run(tmp_path):
    from rlhf_cli.errors import RewardError
    from rlhf_cli.rewards.learned import load_learned_reward

    (tmp_path / "config.yaml").write_text("x: 1\n")
    with pytest.raises(RewardError, match="run directory without a final/ model"):
        load_learned_reward(tmp_path)
    with pytest.raises(RewardError, match="does not exist"):
        load_learned_reward(tmp_path / "nowhere")
