"""Test-wide settings: never touch the network, keep caches in a throwaway directory."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports huggingface_hub/transformers/datasets.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RLHF_CLI_CACHE", tempfile.mkdtemp(prefix="rlhf-cli-test-cache-"))

# Where the trainers (and the `rlhf` subprocesses, which inherit the environment) put their models:
# RLHF_TEST_DEVICE=cpu pins the CPU even on a GPU machine; =cuda insists on a GPU (the session stops
# at once if there is none, so a GPU run cannot pass on the CPU unnoticed). Unset: Accelerate's
# choice (the GPU where there is one). On CPU-only machines nothing changes.
TEST_DEVICE = os.environ.get("RLHF_TEST_DEVICE", "")
if TEST_DEVICE == "cpu":
    os.environ["ACCELERATE_USE_CPU"] = "true"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import make_tiny_gpt2, make_word_tokenizer  # noqa: E402


def pytest_configure(config) -> None:
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("RLHF_TEST_DEVICE=cuda, but torch sees no CUDA device.")


def pytest_report_header(config) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"rlhf_cli models on: {TEST_DEVICE or 'Accelerate default'} (CUDA device: {gpu})"


@pytest.fixture(scope="session")
def word_tokenizer():
    """A small word-level tokenizer (no download): <pad>=0, <eos>=1, <unk>=2, then words."""
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, word_tokenizer):
    """A directory holding a tiny random GPT-2 and its tokenizer, as save_pretrained writes them."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = make_tiny_gpt2(word_tokenizer)
    model.save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: the models are tiny, the machine's cores are shared, and a
    launched process of the 2-process tests uses one thread too (same reductions, same numbers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
