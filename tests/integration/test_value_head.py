"""Value-head wrappers on tiny GPT-2 / T5 models built from config: save/load (ours and TRL's layout),
forward outputs against naive computations, logits_to_keep, and disable_dropout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from rlhf_cli.errors import ModelLoadError
from rlhf_cli.models import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, disable_dropout

torch.set_num_threads(1)
VOCAB = 60


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def tiny_t5(seed: int = 0, dropout: float = 0.0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=dropout,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def with_distinct_head(model):
    """A head whose weight and bias are both non-trivial, so a fresh head cannot pass for a loaded one."""
    with torch.no_grad():
        model.v_head.summary.weight.copy_(torch.linspace(-1, 1, model.v_head.summary.weight.numel()).view(1, -1))
        model.v_head.summary.bias.fill_(0.375)
    return model.eval()


def ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# --- save / load ---------------------------------------------------------------------------------


def test_causal_round_trip_restores_weights_head_and_outputs(tmp_path):
    model = with_distinct_head(AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "value_head.safetensors").is_file()
    assert set(load_file(tmp_path / "value_head.safetensors")) == {"v_head.summary.weight", "v_head.summary.bias"}

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path).eval()
    assert_same_state(model, loaded)
    with torch.no_grad():
        expected, got = model(input_ids=ids()), loaded(input_ids=ids())
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[2], got[2])


def test_seq2seq_round_trip_restores_weights_head_and_outputs(tmp_path):
    model = with_distinct_head(AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_t5()))
    model.save_pretrained(tmp_path)

    loaded = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(str(tmp_path)).eval()
    assert loaded.is_encoder_decoder
    assert_same_state(model, loaded)
    inputs = {"input_ids": ids(), "decoder_input_ids": ids(length=4, seed=2)}
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[2], got[2])


def test_saved_causal_dir_is_a_plain_hugging_face_model(tmp_path):
    model = with_distinct_head(AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()))
    model.save_pretrained(tmp_path)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_state(model.pretrained_model, plain)
    prompt = ids(batch=1, length=3)
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1)
    got = plain.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert got.shape == (1, 8)
    assert torch.equal(expected, got)


def test_saved_seq2seq_dir_is_a_plain_hugging_face_model(tmp_path):
    model = with_distinct_head(AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_t5()))
    model.save_pretrained(tmp_path)

    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert_same_state(model.pretrained_model, plain)
    prompt = ids(batch=1, length=4)
    expected = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    got = plain.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert got.shape == (1, 5)  # decoder start token + 4
    assert torch.equal(expected, got)


def test_save_pretrained_splits_a_given_wrapper_state_dict(tmp_path):
    """What Accelerate passes after gathering a sharded model: the wrapper's own keys."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2())
    state = {key: value + 1.0 for key, value in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def _trl_head() -> dict[str, torch.Tensor]:
    return {"v_head.summary.weight": torch.randn(1, 32), "v_head.summary.bias": torch.tensor([0.25])}


def _assert_head_is(model, head: dict[str, torch.Tensor]) -> None:
    assert torch.equal(model.v_head.summary.weight, head["v_head.summary.weight"])
    assert torch.equal(model.v_head.summary.bias, head["v_head.summary.bias"])


def test_trl_layout_with_head_inside_model_safetensors(tmp_path):
    language_model = tiny_gpt2()
    language_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    head = _trl_head()
    save_file({**weights, **head}, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    _assert_head_is(loaded, head)
    assert_same_state(language_model, loaded.pretrained_model)


def test_trl_layout_with_sharded_safetensors(tmp_path):
    language_model = tiny_gpt2()
    language_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    head = _trl_head()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": {k: weights[k] for k in names[:5]},
              "model-00002-of-00002.safetensors": {**{k: weights[k] for k in names[5:]}, **head}}
    for shard, tensors in shards.items():
        save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {key: shard for shard, tensors in shards.items() for key in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    _assert_head_is(loaded, head)
    assert_same_state(language_model, loaded.pretrained_model)


def test_trl_layout_with_pytorch_model_bin(tmp_path):
    language_model = tiny_gpt2()
    language_model.config.save_pretrained(tmp_path)
    head = _trl_head()
    torch.save({**language_model.state_dict(), **head}, tmp_path / "pytorch_model.bin")

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    _assert_head_is(loaded, head)
    assert_same_state(language_model, loaded.pretrained_model)


def test_plain_model_dir_gets_a_fresh_head(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    torch.manual_seed(5)
    first = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, v_head_init_strategy="normal", v_head_initializer_range=0.01)
    assert float(first.v_head.summary.weight.std()) < 0.05  # drawn with std 0.01, not loaded
    assert torch.equal(first.v_head.summary.bias, torch.zeros(1))
    assert first.v_head.dropout.p == 0.1


def test_half_a_value_head_is_an_error(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    save_file({"v_head.summary.weight": torch.zeros(1, 32)}, tmp_path / "value_head.safetensors")
    with pytest.raises(ModelLoadError, match="v_head.summary.bias is missing"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_missing_directory_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name_or_path"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "nowhere")


def test_directory_without_a_model_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name_or_path"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_from_pretrained_wraps_an_in_memory_model():
    language_model = tiny_gpt2()
    model = AutoModelForCausalLMWithValueHead.from_pretrained(language_model, summary_dropout_prob=0.3)
    assert model.pretrained_model is language_model
    assert model.config is language_model.config
    assert not model.is_peft_model and not model.is_encoder_decoder
    assert model.v_head.dropout.p == 0.3
    assert model.v_head.summary.weight.shape == (1, 32)
    assert {key for key in model.state_dict() if key.startswith("v_head.")} == {"v_head.summary.weight", "v_head.summary.bias"}
    with pytest.warns(UserWarning, match="already built"):  # TRL ignores loading arguments here
        AutoModelForCausalLMWithValueHead.from_pretrained(language_model, dtype=torch.bfloat16)


def test_wrapping_the_wrong_kind_of_model_says_which_class_to_use():
    with pytest.raises(ValueError, match="AutoModelForSeq2SeqLMWithValueHead"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_t5())
    with pytest.raises(ValueError, match="AutoModelForCausalLMWithValueHead"):
        AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_gpt2())


# --- forward -------------------------------------------------------------------------------------


def test_causal_forward_values_are_the_head_applied_to_the_last_hidden_state():
    model = with_distinct_head(AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()))
    input_ids, mask = ids(), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        logits, loss, values = model(input_ids=input_ids, attention_mask=mask)
        plain = model.pretrained_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    assert logits.shape == (2, 6, VOCAB) and values.shape == (2, 6)
    assert values.dtype == torch.float32 and loss is None
    assert torch.equal(logits, plain.logits)
    hidden = plain.hidden_states[-1]
    naive = torch.stack([
        torch.stack([hidden[b, t] @ model.v_head.summary.weight[0] + model.v_head.summary.bias[0] for t in range(6)])
        for b in range(2)
    ])
    torch.testing.assert_close(values, naive)


def test_causal_forward_returns_the_loss_when_given_labels():
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()).eval()
    with torch.no_grad():
        _, loss, _ = model(input_ids=ids(), labels=ids())
        expected = model.pretrained_model(input_ids=ids(), labels=ids()).loss
    assert torch.equal(loss, expected)


def test_bfloat16_model_keeps_its_logits_dtype_and_gives_float32_values():
    language_model = tiny_gpt2().to(torch.bfloat16)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(language_model).eval()
    assert model.v_head.summary.weight.dtype == torch.float32
    with torch.no_grad():
        logits, _, values = model(input_ids=ids())
        hidden = language_model(input_ids=ids(), output_hidden_states=True).hidden_states[-1]
    assert logits.dtype == torch.bfloat16
    assert values.dtype == torch.float32
    # The head ran in float32 on the upcast hidden states, not in bfloat16.
    torch.testing.assert_close(values, model.v_head.summary(hidden.float()).squeeze(-1), rtol=0, atol=0)


@pytest.mark.parametrize("keep", [3, 1, 0])
def test_logits_to_keep_matches_slicing_the_full_output(keep):
    model = with_distinct_head(AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()))
    with torch.no_grad():
        full_logits, _, full_values = model(input_ids=ids())
        logits, _, values = model(input_ids=ids(), logits_to_keep=keep)
    expected_width = keep or 6
    assert logits.shape == (2, expected_width, VOCAB) and values.shape == (2, expected_width)
    torch.testing.assert_close(logits, full_logits[:, 6 - expected_width:])
    torch.testing.assert_close(values, full_values[:, 6 - expected_width:])


def test_logits_to_keep_with_position_indices():
    model = with_distinct_head(AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2()))
    positions = torch.tensor([0, 2, 5])
    with torch.no_grad():
        full_logits, _, full_values = model(input_ids=ids())
        logits, _, values = model(input_ids=ids(), logits_to_keep=positions)
    torch.testing.assert_close(logits, full_logits[:, positions])
    torch.testing.assert_close(values, full_values[:, positions])


def test_seq2seq_forward_values_come_from_the_decoder():
    model = with_distinct_head(AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_t5()))
    inputs = {
        "input_ids": ids(),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "decoder_input_ids": ids(length=4, seed=2),
        "decoder_attention_mask": torch.ones(2, 4, dtype=torch.long),
    }
    with torch.no_grad():
        logits, loss, values = model(**inputs)
        plain = model.pretrained_model(**inputs, output_hidden_states=True)
        kept_logits, _, kept_values = model(**inputs, logits_to_keep=2)
    assert logits.shape == (2, 4, VOCAB) and values.shape == (2, 4) and values.dtype == torch.float32
    assert loss is None
    assert torch.equal(logits, plain.logits)
    decoder_hidden = plain.decoder_hidden_states[-1]
    torch.testing.assert_close(values, decoder_hidden @ model.v_head.summary.weight[0] + model.v_head.summary.bias[0])
    torch.testing.assert_close(kept_logits, logits[:, -2:])
    torch.testing.assert_close(kept_values, values[:, -2:])


def test_gradient_checkpointing_passes_through():
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.pretrained_model.is_gradient_checkpointing


# --- disable_dropout -----------------------------------------------------------------------------


def _two_train_passes(model, **inputs):
    model.train()
    with torch.no_grad():
        return model(**inputs), model(**inputs)


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output.logits


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(dropout=0.5)), id="gpt2-wrapper"),
        pytest.param(lambda: tiny_t5(dropout=0.5), id="t5"),
        # Llama has no nn.Dropout: its attention reads the float attribute attention_dropout.
        pytest.param(
            lambda: LlamaForCausalLM(LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=32, attention_dropout=0.5, attn_implementation="eager",
            )),
            id="llama",
        ),
        # Falcon reads config.hidden_dropout / config.attention_dropout at forward time.
        pytest.param(
            lambda: FalconForCausalLM(FalconConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.5,
                attention_dropout=0.5, new_decoder_architecture=False, parallel_attn=False, bias=True,
            )),
            id="falcon",
        ),
    ],
)
def test_disable_dropout_makes_train_mode_deterministic(build):
    torch.manual_seed(0)
    model = build()
    inputs = {"input_ids": ids()}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids(length=4, seed=2)

    first, second = _two_train_passes(model, **inputs)
    assert not torch.equal(_first_tensor(first), _first_tensor(second))  # dropout is really on

    disable_dropout(model)
    first, second = _two_train_passes(model, **inputs)
    assert torch.equal(_first_tensor(first), _first_tensor(second))
    if isinstance(first, tuple):  # the value-head wrapper: values too
        assert torch.equal(first[2], second[2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(_first_tensor(model(**inputs)), _first_tensor(first))


def test_disable_dropout_zeroes_layers_attributes_and_config():
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(dropout=0.5))
    disable_dropout(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert model.v_head.dropout.p == 0.0
    config = model.pretrained_model.config
    assert (config.attn_pdrop, config.resid_pdrop, config.embd_pdrop) == (0.0, 0.0, 0.0)

    t5 = tiny_t5(dropout=0.5)
    disable_dropout(t5)
    assert t5.config.dropout_rate == 0.0
    assert t5.encoder.block[0].layer[0].SelfAttention.dropout == 0.0  # the float T5 attention reads
