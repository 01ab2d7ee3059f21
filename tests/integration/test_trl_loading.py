"""TRL 0.11's from_pretrained keywords (issue 24): peft_config, a trained adapter with is_trainable, the
reward adapter and compute_reward_score, an already built model with loading arguments, and the
transformers-4 quantisation keywords."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.errors import ModelLoadError
from rlhf_cli.models import trl_loading
from tests.tiny import make_tiny_gpt2

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def lora(task_type="CAUSAL_LM"):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type=task_type)


def trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.fixture(scope="module")
def reward_adapter_dir(tmp_path_factory, tiny_gpt2_dir):
    """A LoRA sequence-classification reward model on the tiny GPT-2, saved with its score head, and
    the scores it gives two fixed sequences."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(1)
    classifier = peft.get_peft_model(GPT2ForSequenceClassification.from_pretrained(tiny_gpt2_dir, num_labels=2), lora("SEQ_CLS"))
    with torch.no_grad():  # a LoRA B of zero would make the adapter a no-op; the test must see it act
        for name, parameter in classifier.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    classifier.eval()
    inputs = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        expected = classifier(inputs).logits
    path = tmp_path_factory.mktemp("reward-adapter")
    classifier.save_pretrained(path)
    return path, inputs, expected


def test_peft_config_wraps_the_loaded_model_with_a_trainable_adapter(tiny_gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=lora())
    assert model.is_peft_model and isinstance(model.pretrained_model, peft.PeftModel)
    trainable = trainable_names(model)
    assert trainable and all("lora_" in name or name.startswith("v_head.") for name in trainable)
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= trainable
    plain = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=None)
    assert not plain.is_peft_model


def test_peft_config_must_be_a_peft_config(tiny_gpt2_dir):
    with pytest.raises(ValueError, match="peft.PeftConfig"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config={"r": 4})


def test_saved_peft_policy_reloads_with_its_adapter_trainable_only_when_asked(tiny_gpt2_dir, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=lora())
    with torch.no_grad():
        model.v_head.summary.weight.add_(1.0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "adapter_config.json").is_file()
    inputs = torch.tensor([[3, 4, 5, 6]])
    model.eval()
    with torch.no_grad():
        expected_logits, _, expected_values = model(inputs)
    for is_trainable in (True, False):
        loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, is_trainable=is_trainable)
        assert loaded.is_peft_model
        assert any("lora_" in name for name in trainable_names(loaded)) is is_trainable
        loaded.eval()
        with torch.no_grad():
            logits, _, values = loaded(inputs)
        torch.testing.assert_close(logits, expected_logits)
        torch.testing.assert_close(values, expected_values)


def test_reward_adapter_scores_as_the_reward_model_and_stays_frozen(tiny_gpt2_dir, reward_adapter_dir):
    path, inputs, expected = reward_adapter_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=lora(), reward_adapter=str(path))
    model.train()
    trainable_before = trainable_names(model)
    scores = model.compute_reward_score(input_ids=inputs, attention_mask=torch.ones_like(inputs))
    assert scores.shape == (2, 4, 2) and not scores.requires_grad
    torch.testing.assert_close(scores[:, -1, :], expected, atol=1e-5, rtol=1e-5)  # the classifier reads the last token
    # The policy's adapter is active again, in the mode and with the trainable set it had; the reward
    # adapter and its head never train.
    assert model.pretrained_model.active_adapter == "default" and model.training
    assert trainable_names(model) == trainable_before
    assert not any("reward_adapter" in name or name.startswith("score.") for name in trainable_before)
    # The policy itself is the base model plus its own (zero-initialised) adapter, not the reward's.
    with torch.no_grad():
        policy_logits = model(inputs)[0]
        with model.pretrained_model.disable_adapter():
            base_logits = model(inputs)[0]
    torch.testing.assert_close(policy_logits, base_logits)


def test_reward_adapter_needs_a_peft_policy_and_scoring_needs_a_reward_adapter(tiny_gpt2_dir, reward_adapter_dir):
    with pytest.raises(ValueError, match="needs a PEFT policy"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, reward_adapter=str(reward_adapter_dir[0]))
    with pytest.raises(ValueError, match="must be a string"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=lora(), reward_adapter=1)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=lora())
    with pytest.raises(ValueError, match="no reward adapter"):
        model.compute_reward_score(torch.tensor([[1, 2]]))


def test_a_step_trains_the_policy_adapter_and_head_only(word_tokenizer, tiny_gpt2_dir, reward_adapter_dir):
    """The reference is the base model (adapters disabled); the reward adapter gets no gradient."""
    path, inputs, expected = reward_adapter_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, peft_config=lora(), reward_adapter=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=0.1), model, tokenizer=word_tokenizer)
    assert trainer.ref_model is None
    trainer.optimizer.zero_grad = functools.partial(trainer.optimizer.zero_grad, set_to_none=False)  # keep the step's grads
    scores = model.compute_reward_score(inputs)[:, -1, 0]
    trainer.step([inputs[0, :2], inputs[1, :2]], [inputs[0, 2:], inputs[1, 2:]], list(scores))
    with_grad = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_grad == trainable_names(model)
    assert not any("reward_adapter" in name or name.startswith("score.") for name in with_grad)
    torch.testing.assert_close(model.compute_reward_score(inputs)[:, -1, :], expected, atol=1e-5, rtol=1e-5)


def test_an_already_built_model_ignores_loading_arguments(word_tokenizer):
    language_model = make_tiny_gpt2(word_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLMWithValueHead.from_pretrained(language_model, is_trainable=True, token=None)
    assert model.pretrained_model is language_model and not caught  # TRL's own keywords: silently
    with pytest.warns(UserWarning, match=r"ignores \['torch_dtype'\]"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(language_model, torch_dtype=torch.bfloat16, is_trainable=True)
    assert next(model.pretrained_model.parameters()).dtype == torch.float32
    wrapped = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer), peft_config=lora())
    assert wrapped.is_peft_model


def test_false_quantisation_keywords_are_accepted(tiny_gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, load_in_8bit=False, load_in_4bit=False, device_map=None)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
@pytest.mark.parametrize(
    ("kwargs", "names"),
    [({"load_in_8bit": True}, "load_in_8bit=True"), ({"load_in_4bit": True}, "load_in_4bit=True"), ({"device_map": {"": 0}}, "device_map")],
)
def test_gpu_only_loading_is_refused_clearly_without_a_gpu(tiny_gpt2_dir, kwargs, names):
    with pytest.raises(ModelLoadError, match=f"{names}.*(CUDA|GPU)"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2_dir, **kwargs)


def test_load_in_8bit_becomes_a_bitsandbytes_config_where_it_can_run(monkeypatch):
    from transformers import BitsAndBytesConfig

    real_find_spec = trl_loading.importlib.util.find_spec
    monkeypatch.setattr(trl_loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trl_loading.importlib.util, "find_spec", lambda name: object() if name == "bitsandbytes" else real_find_spec(name))
    kwargs = {"load_in_8bit": True, "load_in_4bit": False, "torch_dtype": torch.float16}
    trl_loading.translate_legacy_kwargs(kwargs)
    assert set(kwargs) == {"quantization_config", "device_map", "torch_dtype"}
    assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig) and kwargs["quantization_config"].load_in_8bit
    assert kwargs["device_map"] == {"": 0}  # this process's GPU, as TRL places a quantised model
    with pytest.raises(ModelLoadError, match="choose one"):
        trl_loading.translate_legacy_kwargs({"load_in_8bit": True, "load_in_4bit": True})
