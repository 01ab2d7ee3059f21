"""LoRA reward models (issue 19 point 1, `model.lora.enabled=true`): only the adapters and the scalar head
train, the language model's own weights stay bit for bit, and final/ (the adapters merged) loads back
through the learned-reward option scoring as the trained adapter model does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from rlhf_cli.config.schema import ModelConfig
from rlhf_cli.engine.export import save_final
from rlhf_cli.reward_model.backbone import load_reward_backbone
from rlhf_cli.reward_model.data import tokenize_pairs
from rlhf_cli.reward_model.scoring import (
    VALUE_HEAD,
    ScoringRule,
    encode_texts,
    left_padded,
    sequence_scores,
)
from rlhf_cli.reward_model.trainer import RewardModelTrainer
from rlhf_cli.rewards.learned import load_learned_reward
from tests.integration.test_reward_model import _planted_rows

pytest.importorskip("peft")

PROMPTS = ["the movie", "a film that", "i"]
RESPONSES = [" was good", " was really really bad and boring", " loved it"]


def _is_trained(name: str) -> bool:
    return "lora_" in name or name.startswith("v_head.")


def _lora_model_cfg(tiny_gpt2_dir: Path):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {
        "source": "pretrained", "name_or_path": str(tiny_gpt2_dir), "lora": {"enabled": True, "r": 4, "target_modules": ["c_attn"]},
    })


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_lora_trains_only_adapters_and_head_and_final_loads_as_the_learned_reward(tiny_gpt2_dir, word_tokenizer, tmp_path, one_thread):
    torch.manual_seed(0)
    backbone = load_reward_backbone(_lora_model_cfg(tiny_gpt2_dir))
    model, tokenizer = backbone.model, backbone.tokenizer
    assert backbone.head == VALUE_HEAD and model.is_peft_model
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(_is_trained(name) for name in trainable)
    assert any("lora_B" in name for name in trainable) and any(name.startswith("v_head.") for name in trainable)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    pairs = tokenize_pairs(_planted_rows(64, seed=0), tokenizer, 64)
    trainer = RewardModelTrainer(model, tokenizer, pairs, learning_rate=1e-2, batch_size=16, accelerator=Accelerator(cpu=True))
    for batch in range(trainer.batches_per_epoch):
        assert torch.isfinite(torch.tensor(trainer.step(0, batch)["train/loss"]))
    trained = trainer.unwrapped_model
    after = dict(trained.named_parameters())
    assert after.keys() == before.keys()
    frozen = [name for name in before if not _is_trained(name)]
    assert frozen and all(torch.equal(after[name], before[name]) for name in frozen)  # the base, bit for bit
    assert all(not torch.equal(after[name], before[name]) for name in before if "lora_B" in name or name.startswith("v_head."))

    final = tmp_path / "rm" / "final"
    save_final(trained, tokenizer, final)  # what `rlhf reward` writes for a value-head model: the adapters merged
    ScoringRule(max_length=64).save(final)
    assert not (final / "adapter_config.json").exists()
    scores = load_learned_reward(tmp_path / "rm", batch_size=3, device="cpu")(PROMPTS, RESPONSES)
    trained.eval()
    ids, _ = encode_texts(tokenizer, [p + r for p, r in zip(PROMPTS, RESPONSES)], 64)
    with torch.no_grad():  # the adapter model itself (unmerged), one unpadded text at a time
        expected = [float(sequence_scores(trained, left_padded([one], tokenizer.pad_token_id))[0]) for one in ids]
    assert scores == pytest.approx(expected, abs=1e-5)  # merging W + BA rounds once: float32 noise only


@pytest.mark.slow
def test_rlhf_reward_with_lora_end_to_end(tmp_path):
    """`rlhf reward model.lora.enabled=true`: the modules without adapters leave final/ as they were built,
    those with adapters (merged) moved, and reward=learned loads the run."""
    from safetensors.torch import load_file

    from rlhf_cli.models import load_policy_and_tokenizer

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rlhf_cli", "reward", "+recipe=rm_smoke", "model.lora.enabled=true",
               "model.lora.target_modules=[c_attn]", "optim.learning_rate=1e-2", f"output_dir={tmp_path / 'rm'}"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rule = json.loads((tmp_path / "rm" / "final" / "reward_model.json").read_text())
    assert rule["head"] == VALUE_HEAD
    # The starting weights, rebuilt from the run's own model config without the adapters.
    cfg = OmegaConf.load(tmp_path / "rm" / "config.yaml")
    cfg.model.lora.enabled = False
    base, _ = load_policy_and_tokenizer(cfg.model)
    initial = base.pretrained_model.state_dict()
    final = load_file(tmp_path / "rm" / "final" / "model.safetensors")
    assert set(final) == set(initial) - {"lm_head.weight"}  # the LM head is tied to wte: saved once
    adapted = [key for key in final if ".c_attn." in key and key.endswith("weight")]
    assert adapted and all(not torch.equal(final[key], initial[key]) for key in adapted)
    untouched = [key for key in final if key not in adapted]
    assert all(torch.equal(final[key], initial[key]) for key in untouched), [k for k in untouched if not torch.equal(final[k], initial[k])]
    scores = load_learned_reward(tmp_path / "rm", device="cpu")(PROMPTS, RESPONSES)
    assert len(scores) == 3 and all(torch.isfinite(torch.tensor(scores)))
