"""The whole RLHF loop through the real command line (issue 19 points 5 and 6): `rlhf reward` writes a
reward model, `rlhf train reward=learned reward.model=<run>` optimises a policy against it with VADER
watching, and the learned reward the run loads scores exactly as the trained model's own forward."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

# The rm_smoke pairs are 2-8 token openings plus 8-12 token continuations: a 12-token limit truncates
# some, so the rule the learned reward reads back from reward_model.json has something to do.
MAX_LENGTH = 12


def _rlhf(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> Path:
    """tmp/rm: a `rlhf reward` run; tmp/ppo: PPO on it, VADER and the same learned model as monitors."""
    tmp = tmp_path_factory.mktemp("loop")
    _rlhf(tmp, "reward", "+recipe=rm_smoke", f"data.max_length={MAX_LENGTH}", f"output_dir={tmp / 'rm'}")
    # The learned model is also a monitor: the same scorer on the same responses, so its logged mean must
    # equal the optimised reward's, which ties env/reward_mean to this very model.
    _rlhf(tmp, "train", "+recipe=smoke", "reward=learned", f"reward.model={tmp / 'rm'}",
          f"reward.monitor=[{{type: vader}}, {{type: learned, model: '{tmp / 'rm'}'}}]", f"output_dir={tmp / 'ppo'}")
    return tmp


def test_ppo_on_the_learned_reward_logs_and_reports_the_monitor(loop):
    rows = [json.loads(line) for line in (loop / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(row["env/reward_mean"]) and math.isfinite(row["env/monitor/vader_mean"])
        assert row["env/monitor/learned_mean"] == pytest.approx(row["env/reward_mean"], abs=1e-6)
        assert row["ppo/mean_scores"] == pytest.approx(row["env/reward_mean"], abs=1e-6)
    report = (loop / "ppo" / "report.md").read_text()
    assert "monitor vader (not optimised): held-out mean" in report
    assert "monitor learned (not optimised): held-out mean" in report
    config = OmegaConf.load(loop / "ppo" / "config.yaml")
    assert config.reward.type == "learned" and Path(config.reward.model) == loop / "rm"


def _by_hand(model, tokenizer, prompt: str, response: str) -> tuple[float, bool]:
    """The trained model's own forward on one unpadded text: prompt + response as written, no special
    tokens, its last MAX_LENGTH tokens, the value head on the last position; and whether it was cut."""
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        _, _, values = model(input_ids=torch.tensor([ids[-MAX_LENGTH:]]))
    return float(values[0, -1]), len(ids) > MAX_LENGTH


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_the_learned_reward_of_the_run_scores_like_the_trained_model(loop):
    from transformers import AutoTokenizer

    from rlhf_cli.models import AutoModelForCausalLMWithValueHead
    from rlhf_cli.rewards import build_reward

    rule = json.loads((loop / "rm" / "final" / "reward_model.json").read_text())
    assert rule["max_length"] == MAX_LENGTH and rule["template"] == "prompt+response" and rule["truncation"] == "keep_last"
    # The reward exactly as the PPO run built it: its own resolved config, on the CPU.
    cfg = OmegaConf.load(loop / "ppo" / "config.yaml").reward
    cfg.device = "cpu"
    reward = build_reward(cfg)
    prompts = ["I watched this movie", "The", "After all these years, the sequel"]
    responses = [" and loved every minute of it.", " worst", " is a dull, lifeless and far too long mess of a film that nobody asked for."]
    scores = reward(prompts, responses)  # one left-padded batch of three lengths, the longest truncated
    final = loop / "rm" / "final"  # loaded by hand, as transformers and the value-head wrapper load it
    model, tokenizer = AutoModelForCausalLMWithValueHead.from_pretrained(str(final)).eval(), AutoTokenizer.from_pretrained(final)
    expected = [_by_hand(model, tokenizer, prompt, response) for prompt, response in zip(prompts, responses)]
    assert [cut for _, cut in expected] == [False, False, True]
    assert scores == pytest.approx([score for score, _ in expected], abs=1e-6)
