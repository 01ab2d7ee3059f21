"""Value-head models behave as legacy TRL 0.11.4's (issue 10, points 11-14), on tiny models from config."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model, T5Config, T5Model

from rlhf_cli import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead
from rlhf_cli.errors import ModelLoadError

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_config(**kwargs) -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1, **kwargs)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config())


def trl_head(seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"v_head.summary.weight": torch.randn(1, 32, generator=gen), "v_head.summary.bias": torch.randn(1, generator=gen)}


def assert_head_is(model, head) -> None:
    assert torch.equal(model.v_head.summary.weight, head["v_head.summary.weight"])
    assert torch.equal(model.v_head.summary.bias, head["v_head.summary.bias"])


# 11. v_head.summary / v_head.dropout, summary_dropout_prob --------------------------------------------------
def test_v_head_has_summary_and_dropout_from_keyword_or_config():
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(), summary_dropout_prob=0.3)
    assert isinstance(model.v_head.summary, torch.nn.Linear)
    assert (model.v_head.summary.in_features, model.v_head.summary.out_features) == (32, 1)
    assert isinstance(model.v_head.dropout, torch.nn.Dropout) and model.v_head.dropout.p == 0.3

    language_model = tiny_gpt2()
    language_model.config.summary_dropout_prob = 0.25  # set on the config before wrapping, as TRL reads it
    assert AutoModelForCausalLMWithValueHead.from_pretrained(language_model).v_head.dropout.p == 0.25
    assert AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()).v_head.dropout.p == 0.1


def test_summary_dropout_prob_on_a_saved_config_is_read_when_loading(tmp_path):
    language_model = tiny_gpt2()
    language_model.config.summary_dropout_prob = 0.4
    language_model.save_pretrained(tmp_path)
    assert AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path).v_head.dropout.p == 0.4


# 12. TRL's state-dict keys -------------------------------------------------------------------------------
def test_state_dict_uses_the_wrapped_models_keys_plus_the_head():
    language_model = tiny_gpt2()
    model = AutoModelForCausalLMWithValueHead.from_pretrained(language_model)
    keys = set(model.state_dict())
    assert {k for k in keys if k.startswith("v_head.")} == {"v_head.summary.weight", "v_head.summary.bias"}
    assert {k for k in keys if not k.startswith("v_head.")} == set(language_model.state_dict())

    other = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(seed=1))
    other.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_load_state_dict_takes_the_older_prefixed_layout_and_reports_in_trl_keys():
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2())
    prefixed = {("" if k.startswith("v_head.") else "pretrained_model.") + k: v for k, v in model.state_dict().items()}
    other = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(seed=1))
    other.load_state_dict(prefixed)
    assert torch.equal(other.v_head.summary.weight, model.v_head.summary.weight)
    assert torch.equal(other.pretrained_model.transformer.h[0].attn.c_attn.weight, model.pretrained_model.transformer.h[0].attn.c_attn.weight)
    partial = {k: v for k, v in model.state_dict().items() if k != "v_head.summary.bias"}
    result = other.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["v_head.summary.bias"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="v_head.summary.bias"):
        other.load_state_dict(partial)


def test_save_pretrained_of_trl_state_dict_still_loads_in_plain_transformers(tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2())
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # TRL-keyed state dict, as TRL passes it
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.pretrained_model.state_dict()[key]), key
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert torch.equal(reloaded.v_head.summary.weight, model.v_head.summary.weight)


# 13. Class attributes, no LM head, bf16 --------------------------------------------------------------------
def test_trl_class_attributes():
    for cls in (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead):
        assert "lm_head" in cls.lm_head_namings
        assert set(cls.supported_args) == {"summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy"}
    assert AutoModelForCausalLMWithValueHead.transformers_parent_class.__name__ == "AutoModelForCausalLM"
    assert AutoModelForSeq2SeqLMWithValueHead.transformers_parent_class.__name__ == "AutoModelForSeq2SeqLM"


def test_a_model_without_lm_head_is_refused_by_name():
    with pytest.raises(ValueError, match="GPT2Model: it has no language-model head"):
        AutoModelForCausalLMWithValueHead.from_pretrained(GPT2Model(gpt2_config()))
    t5 = T5Model(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="T5Model: it has no language-model head"):
        AutoModelForSeq2SeqLMWithValueHead.from_pretrained(t5)


def test_torch_dtype_bfloat16_loads_the_lm_head_in_bf16_and_runs(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert model.pretrained_model.lm_head.weight.dtype == torch.bfloat16
    logits, _, values = model(input_ids=torch.tensor([[3, 4, 5]]))
    assert logits.shape == (1, 3, 50) and torch.isfinite(logits.float()).all()
    assert values.shape == (1, 3) and values.dtype == torch.float32


# 14. A TRL value head in the weights of a directory or Hub id ------------------------------------------------
def test_head_in_a_separate_pytorch_model_bin_beside_the_model(tmp_path):
    """TRL saves a PEFT policy's head alone in pytorch_model.bin; the model's own weights hold none."""
    language_model = tiny_gpt2()
    language_model.save_pretrained(tmp_path)  # model.safetensors without a head
    head = trl_head()
    torch.save(head, tmp_path / "pytorch_model.bin")
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert_head_is(loaded, head)


def test_head_in_a_separate_safetensors_beside_a_sharded_bin_index(tmp_path):
    language_model = tiny_gpt2()
    language_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {key: "pytorch_model-00001-of-00001.bin" for key in weights}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    head = trl_head()
    save_file(head, tmp_path / "model.safetensors", metadata={"format": "pt"})  # the head alone
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, use_safetensors=False)
    assert_head_is(loaded, head)
    for key, value in language_model.state_dict().items():
        assert torch.equal(loaded.pretrained_model.state_dict()[key], value), key


class _Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_head_files_are_loaded_with_weights_only(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"v_head.summary.weight": _Payload()}, handle)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_hub_id_with_a_trl_head_loads_it_from_the_cache(tmp_path, monkeypatch):
    """A Hub id resolves through the Hugging Face cache (offline here): a TRL checkpoint with its head
    inside model.safetensors, as TRL's save_pretrained writes it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # what the offline check reads
    snapshot = tmp_path / "models--someone--tiny-trl" / "snapshots" / ("0" * 40)
    language_model = tiny_gpt2()
    language_model.save_pretrained(snapshot)
    head = trl_head()
    save_file({**load_file(snapshot / "model.safetensors"), **head}, snapshot / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "models--someone--tiny-trl" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-trl" / "refs" / "main").write_text("0" * 40)
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained("someone/tiny-trl", cache_dir=str(tmp_path))
    assert_head_is(loaded, head)
    with pytest.raises(ModelLoadError):
        AutoModelForCausalLMWithValueHead.from_pretrained("someone/not-cached", cache_dir=str(tmp_path))
