"""Migration (issue 24): TRL 0.11's multi-adapter pattern — LoRA policy from peft_config, reward adapter,
reference = adapters disabled, a datasets.Dataset with a dict collator, the user's eos_token_id and a
LinearLR schedule — runs with only `trl` -> `rlhf_cli` changed."""

from __future__ import annotations

import re
import runpy
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

SCRIPT = Path(__file__).parent / "trl_scripts" / "ppo_multi_adapter_style.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_gpt2_dir):
    """A two-label LoRA reward model on the tiny GPT-2 (adapter non-trivial), saved as an adapter."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(2)
    base = GPT2ForSequenceClassification.from_pretrained(tiny_gpt2_dir, num_labels=2)
    classifier = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, parameter in classifier.named_parameters():
            if "lora_B" in name or "score" in name:
                parameter.normal_(std=0.5)
    path = tmp_path_factory.mktemp("rm-adapter")
    classifier.save_pretrained(path)
    return classifier.eval(), path


@pytest.fixture(scope="module")
def script_run(tiny_gpt2_dir, reward_model):
    patch = pytest.MonkeyPatch()
    patch.setenv("MODEL_NAME", str(tiny_gpt2_dir))
    patch.setenv("RM_ADAPTER", str(reward_model[1]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        patch.undo()


def test_the_script_differs_from_trl_only_in_the_import():
    code = SCRIPT.read_text().split('"""', 2)[2]
    imports = set(re.findall(r"^\s*(?:from|import) (\S+)", code, flags=re.MULTILINE))
    assert {name for name in imports if name.startswith("rlhf_cli")} == {"rlhf_cli", "rlhf_cli.core"}
    assert "rlhf_cli" not in code.replace("from rlhf_cli", "")
    assert imports - {"rlhf_cli", "rlhf_cli.core"} <= {"os", "torch", "datasets", "peft", "transformers"}


def test_rewards_come_from_the_untrained_reward_adapter(script_run, reward_model):
    classifier, _ = reward_model
    assert len(script_run["history"]) == 2  # 8 prompts in batches of 4
    for record in script_run["history"]:
        with torch.no_grad():
            expected = classifier(**record["inputs"]).logits[:, 1]
        torch.testing.assert_close(torch.stack(record["rewards"]), expected, atol=1e-5, rtol=1e-5)


def test_only_the_policy_adapter_and_value_head_trained(script_run, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = script_run["model"]
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).state_dict()
    lora_moved = False
    for name, parameter in model.pretrained_model.named_parameters():
        if "lora_B.default" in name:
            lora_moved |= bool(parameter.abs().sum() > 0)  # zero-initialised, moved by training
        elif "lora_" not in name:  # base weights are frozen
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(parameter.detach(), base[key], rtol=0, atol=0)
    assert lora_moved
    assert not any(p.requires_grad for name, p in model.named_parameters() if "reward_adapter" in name or name.startswith("score."))


def test_generation_schedule_and_reference(script_run):
    history, config = script_run["history"], script_run["config"]
    # eos_token_id=-1 went to generate: no response stopped early.
    assert all(len(r) == script_run["MAX_NEW_TOKENS"] for record in history for r in record["responses"])
    # LinearLR(1.0 -> 0.5 over 2 steps), stepped once per step(): lr_k = lr_0 * (1 - 0.25 k).
    for step, record in enumerate(history):
        assert record["stats"]["ppo/learning_rate"] == pytest.approx(config.learning_rate * (1 - 0.25 * step))
    # The reference is the base model: the first step's policy (zero LoRA B) equals it.
    assert history[0]["stats"]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
