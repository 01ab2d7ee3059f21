"""llama.cpp GGUF checkpoints as models (``model.gguf_file``), on a tiny Llama the test writes itself.

The GGUF is written the way llama.cpp's converter writes one (tensor names from the ``gguf`` package's
name map, Q/K rows permuted for its rotary layout, a byte-level BPE vocabulary with its merges), in
F32 so that loading it must give back the very model it came from. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from rlhf_cli.config.schema import ModelConfig  # noqa: E402
from rlhf_cli.errors import ConfigError, ModelLoadError  # noqa: E402
from rlhf_cli.models import gguf as gguf_models  # noqa: E402
from rlhf_cli.models import load_policy_and_tokenizer  # noqa: E402

TEXTS = [
    "the movie was great and the acting was wonderful",
    "a terrible film with a boring plot and bad actors",
    "i loved the music, the story and the ending!",
    "this is the worst movie i have seen in a long time",
    "the characters were dull but the scenes were beautiful",
]
EOS = "<|endoftext|>"
ROPE_THETA = 10000.0


def _byte_level_bpe():
    """A tiny byte-level BPE tokenizer (GPT-2 style) trained on TEXTS, with EOS as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS)


def _tiny_llama(vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=ROPE_THETA,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1; random ones make a wrong mapping of them visible
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows interleaved per rotary pair; transformers' reader undoes exactly this."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path: Path, model, tokenizer, *, architecture: str = "llama") -> None:
    """``model`` (a LlamaForCausalLM) and ``tokenizer`` as an unquantised (F32) GGUF file."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama-test")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # The vocabulary the way llama.cpp records a byte-level BPE ("gpt2"): tokens by id, merges, token types.
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        weight = tensor.detach().to(torch.float32).numpy()
        if base.endswith("q_proj"):
            weight = _rotary_permute(weight, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            weight = _rotary_permute(weight, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the GGUF file, the LlamaForCausalLM it holds, the tokenizer it holds)."""
    tokenizer = _byte_level_bpe()
    model = _tiny_llama(len(tokenizer), tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    write_llama_gguf(path, model, tokenizer)
    return path, model, tokenizer


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty rlhf_cli cache for this test: conversions start from nothing."""
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _conversions(cache: Path) -> list[Path]:
    root = cache / "gguf"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_gguf_loads_as_the_model_it_came_from(tiny_gguf, own_cache, one_thread) -> None:
    path, model, tokenizer = tiny_gguf
    # The directory + file-name form of the setting.
    cfg = ModelConfig(source="pretrained", name_or_path=str(path.parent), gguf_file=path.name)
    policy, loaded_tokenizer = load_policy_and_tokenizer(cfg)
    assert type(policy.pretrained_model).__name__ == "LlamaForCausalLM"
    for text in TEXTS + ["an unseen sentence, with ünïcode and 123 digits"]:
        assert loaded_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"], text
    assert loaded_tokenizer.eos_token == EOS and loaded_tokenizer.pad_token == EOS  # pad falls back to eos
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"], tokenizer(TEXTS[1])["input_ids"][: len(tokenizer(TEXTS[0])["input_ids"])]])
    with torch.no_grad():
        expected = model(ids).logits
        got = policy.pretrained_model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Converted once into a plain Hugging Face directory that transformers loads without the GGUF.
    [converted] = _conversions(own_cache)
    assert (converted / "config.json").is_file() and (converted / "source.json").is_file()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(converted)
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_second_load_reads_the_cache_without_converting(tiny_gguf, own_cache, monkeypatch, one_thread) -> None:
    path, model, tokenizer = tiny_gguf
    cfg = ModelConfig(source="pretrained", gguf_file=str(path))  # the path form: no name_or_path
    first, _ = load_policy_and_tokenizer(cfg)
    [converted] = _conversions(own_cache)
    stamp = (converted / "source.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was converted a second time")

    monkeypatch.setattr(gguf_models, "convert_gguf", refuse)
    second, _ = load_policy_and_tokenizer(cfg)
    assert _conversions(own_cache) == [converted] and (converted / "source.json").stat().st_mtime_ns == stamp
    ids = torch.tensor([tokenizer(TEXTS[2])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(second.pretrained_model(ids).logits, first.pretrained_model(ids).logits, rtol=0, atol=0)
    # A copy of the file elsewhere has the same content, hence the same conversion.
    copy = path.parent / "elsewhere" / "copy.gguf"
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(path.read_bytes())
    load_policy_and_tokenizer(ModelConfig(source="pretrained", name_or_path=str(copy)))  # name_or_path = the .gguf itself
    assert _conversions(own_cache) == [converted]


def test_gguf_dtype_is_the_configured_one_and_keyed_separately(tiny_gguf, own_cache, one_thread) -> None:
    path, model, _ = tiny_gguf
    policy, _ = load_policy_and_tokenizer(ModelConfig(source="pretrained", gguf_file=str(path), dtype="bfloat16"))
    assert policy.pretrained_model.dtype == torch.bfloat16
    weight = policy.pretrained_model.model.embed_tokens.weight
    torch.testing.assert_close(weight, model.model.embed_tokens.weight.to(torch.bfloat16), rtol=0, atol=0)
    assert [p.name.split("-")[1] for p in _conversions(own_cache)] == ["bfloat16"]


def test_missing_file_and_wrong_source_fail_before_loading(tmp_path, own_cache) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_policy_and_tokenizer(ModelConfig(source="pretrained", name_or_path=str(tmp_path), gguf_file="nope.gguf"))
    with pytest.raises(ConfigError, match="model.source=pretrained"):
        load_policy_and_tokenizer(ModelConfig(source="tiny_gpt2", gguf_file=str(tmp_path / "x.gguf")))
    assert _conversions(own_cache) == []


# ---------------------------------------------------------------------------------------------------
# Through the command line: training from the GGUF, and the user's mistakes as one paragraph each
# ---------------------------------------------------------------------------------------------------


def _rlhf(*args: str, cwd: Path, cache: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", RLHF_CLI_CACHE=str(cache), OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _one_paragraph_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


# The smoke run's sizes, with the tiny GGUF as the model (its prompts are a few BPE tokens long).
_GGUF_RUN = ("+recipe=smoke", "model=smollm2", "steps=2", "checkpoint.every=0")


@pytest.mark.slow
def test_train_and_sample_from_a_gguf(tiny_gguf, tmp_path) -> None:
    path, model, tokenizer = tiny_gguf
    cache = tmp_path / "cache"
    done = _rlhf("train", *_GGUF_RUN, f"model.gguf_file={path}", "output_dir=run", cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr
    assert "Converting the GGUF file" in done.stderr
    [converted] = _conversions(cache)
    # final/ is a plain Llama checkpoint that trained away from the GGUF's weights.
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(final(ids).logits, model(ids).logits)
    # The reference is the GGUF's model, loaded from the cache (no second conversion, no message).
    sampled = _rlhf("sample", "run", "the movie", "--reference", "--n", "2", cwd=tmp_path, cache=cache)
    assert sampled.returncode == 0, sampled.stderr
    assert "Converting" not in sampled.stderr and _conversions(cache) == [converted]
    assert "over 2 samples (1 prompts × 2)" in sampled.stdout


@pytest.mark.slow
def test_cli_error_for_a_missing_gguf_file(tmp_path) -> None:
    done = _rlhf("train", *_GGUF_RUN, f"model.gguf_file={tmp_path / 'missing.gguf'}", "output_dir=run",
                 cwd=tmp_path, cache=tmp_path / "cache")
    message = _one_paragraph_error(done)
    assert "model.gguf_file=" in message and "missing.gguf" in message and "does not exist" in message
    assert not (tmp_path / "run" / "config.yaml").exists(), "the run stopped before writing its directory"


@pytest.mark.slow
def test_cli_error_for_an_architecture_transformers_cannot_read(tiny_gguf, tmp_path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    unknown = "rwkv7"
    assert unknown not in GGUF_SUPPORTED_ARCHITECTURES
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), unknown)  # a header is all the check reads
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    done = _rlhf("train", *_GGUF_RUN, f"model.gguf_file={path}", "output_dir=run", cwd=tmp_path, cache=tmp_path / "cache")
    message = _one_paragraph_error(done)
    assert f"'{unknown}'" in message and "cannot load from GGUF" in message and "llama" in message


@pytest.mark.slow
def test_cli_error_when_gguf_is_not_installed(tiny_gguf, tmp_path) -> None:
    path, _, _ = tiny_gguf
    # sitecustomize runs at interpreter start: a None entry in sys.modules makes `gguf` unimportable
    # (and invisible to importlib.util.find_spec), as if the package were not installed.
    hide = tmp_path / "hide_gguf"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        sys.modules["gguf"] = None
    """), encoding="utf-8")
    done = _rlhf("train", *_GGUF_RUN, f"model.gguf_file={path}", "output_dir=run", cwd=tmp_path,
                 cache=tmp_path / "cache", pythonpath=str(hide))
    message = _one_paragraph_error(done)
    assert "'gguf' package" in message and "pip install 'rlhf-cli[gguf]'" in message
