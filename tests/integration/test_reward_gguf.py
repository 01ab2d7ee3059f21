"""GGUF reward backbones (issue 19 point 1, `model.gguf_file`): the tiny Llama GGUF of test_gguf.py loads
as a value-head reward model that starts from the GGUF's very weights and takes training steps with a
finite loss, through the library trainer and through `rlhf reward`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

pytest.importorskip("gguf")

from rlhf_cli.config.schema import ModelConfig
from rlhf_cli.data.preferences import PreferenceRows
from rlhf_cli.reward_model.backbone import load_reward_backbone
from rlhf_cli.reward_model.data import tokenize_pairs
from rlhf_cli.reward_model.scoring import VALUE_HEAD
from rlhf_cli.reward_model.trainer import RewardModelTrainer
from tests.integration import test_gguf
from tests.integration.test_gguf import TEXTS


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """test_gguf.py's tiny Llama as an F32 GGUF: (its path, the LlamaForCausalLM, the tokenizer)."""
    tokenizer = test_gguf._byte_level_bpe()
    model = test_gguf._tiny_llama(len(tokenizer), tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    test_gguf.write_llama_gguf(path, model, tokenizer)
    return path, model, tokenizer


def _pairs() -> PreferenceRows:
    """Each positive review of TEXTS against each negative one, after the same two-word prompt."""
    good, bad = [TEXTS[0], TEXTS[2]], [TEXTS[1], TEXTS[3]]
    chosen = [" " + g for g in good for _ in bad]
    rejected = [" " + b for _ in good for b in bad]
    prompts = ["the review:"] * len(chosen)
    return PreferenceRows(prompts, chosen, list(prompts), rejected)


def test_a_gguf_backbone_trains_as_a_reward_model(tiny_gguf, tmp_path, monkeypatch, one_thread):
    path, llama, tokenizer = tiny_gguf
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))  # converted afresh, as a user's first run
    torch.manual_seed(0)
    backbone = load_reward_backbone(ModelConfig(source="pretrained", gguf_file=str(path)))
    assert backbone.head == VALUE_HEAD
    model = backbone.model
    assert type(model.pretrained_model).__name__ == "LlamaForCausalLM"
    # It starts from the GGUF's weights (F32: exactly the model it was written from).
    loaded = model.pretrained_model.state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in llama.state_dict().items())
    pairs = tokenize_pairs(_pairs(), backbone.tokenizer, 64)
    assert pairs.chosen_ids[0] == tokenizer("the review: " + TEXTS[0])["input_ids"]  # the GGUF's own vocabulary
    trainer = RewardModelTrainer(model, backbone.tokenizer, pairs, learning_rate=1e-2, batch_size=2,
                                 accelerator=Accelerator(cpu=True))
    losses = [trainer.step(0, batch)["train/loss"] for batch in range(trainer.batches_per_epoch)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # The transformer moved (the LM head does not: a reward model never reads its logits).
    trained = trainer.unwrapped_model.pretrained_model.state_dict()
    assert not torch.equal(trained["model.layers.1.mlp.down_proj.weight"], llama.model.layers[1].mlp.down_proj.weight)


@pytest.mark.slow
def test_rlhf_reward_on_a_gguf_backbone(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", RLHF_CLI_CACHE=str(tmp_path / "cache"))
    # rm_smoke's IMDb pairs and sizes, with the GGUF as the backbone (rm_smoke's own model is tiny_gpt2).
    command = [sys.executable, "-m", "rlhf_cli", "reward", "+recipe=rm_smoke", "model=smollm2", "model.source=pretrained",
               f"model.gguf_file={path}", "optim.steps=2", f"output_dir={tmp_path / 'rm'}"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Converting the GGUF file" in done.stderr
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["train/loss"]) for row in rows)
    config = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert config["model_type"] == "llama"
    from rlhf_cli.rewards.learned import load_learned_reward

    scores = load_learned_reward(tmp_path / "rm", device="cpu")(["the movie"], [" was great"])
    assert len(scores) == 1 and math.isfinite(scores[0])
