"""check_launch: what a launch must satisfy, each a ConfigError before any model loads."""

from __future__ import annotations

import functools
import importlib.util
import types

import pytest
import torch

from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.engine import components
from rlhf_cli.config.launch import mixed_precision_of
from rlhf_cli.engine.components import check_launch, launch_state
from rlhf_cli.errors import ConfigError


def _state(num_processes: int = 1, device: str = "cpu"):
    return types.SimpleNamespace(num_processes=num_processes, device=torch.device(device))


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """A plain process: no `accelerate launch` settings in the environment."""
    for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """Loading a model during a launch check is a bug: make it fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded during check_launch")

    monkeypatch.setattr("rlhf_cli.models.builder.load_policy_and_tokenizer", refuse)
    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", refuse)


@functools.lru_cache(maxsize=None)
def smoke(*overrides: str):
    """The smoke recipe with ``overrides`` (composed once; check_launch only reads it)."""
    return compose_train_config(["+recipe=smoke", *overrides])


def test_the_smoke_run_passes_on_one_and_two_processes():
    check_launch(smoke(), _state(1))
    check_launch(smoke(), _state(2))


@pytest.mark.parametrize(
    ("overrides", "processes", "message"),
    [
        ((), 3, r"ppo.batch_size=8 is not divisible by the 3 processes of this launch; choose a multiple of 3"),
        (("ppo.batch_size=12", "ppo.mini_batch_size=4"), 3, r"ppo.mini_batch_size=4 is not divisible by the 3 processes"),
        (("ppo.batch_size=8", "ppo.mini_batch_size=2", "ppo.gradient_accumulation_steps=3"), 2, r"ppo.batch_size=8 is not divisible by ppo.mini_batch_size × ppo.gradient_accumulation_steps = 2 × 3 = 6"),
    ],
)
def test_sizes_that_do_not_split_over_the_processes(overrides, processes, message):
    with pytest.raises(ConfigError, match=message):
        check_launch(smoke(*overrides), _state(processes))


def test_fp16_on_the_cpu_is_refused_and_bf16_allowed(monkeypatch):
    monkeypatch.setattr(components.precision_support, "cpu_supports_bf16", lambda: True)
    with pytest.raises(ConfigError, match=r"ppo.mixed_precision=fp16 needs a GPU.*ppo.mixed_precision=bf16"):
        check_launch(smoke("ppo.mixed_precision=fp16"), _state())
    check_launch(smoke("ppo.mixed_precision=bf16"), _state())
    check_launch(smoke("ppo.mixed_precision=fp16"), _state(device="cuda"))


def test_bf16_autocast_on_a_cpu_that_emulates_bfloat16_is_refused(monkeypatch):
    """Without AVX-512 BF16 or AMX, bf16 matmuls are emulated (about 40x slower than float32): the
    launch stops and names the float32 setting, whether the key or the launcher asked for bf16."""
    monkeypatch.setattr(components.precision_support, "cpu_supports_bf16", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(ConfigError, match=r"ppo.mixed_precision=bf16 needs a CPU with native bfloat16.*Use "
                                          r"ppo.mixed_precision=no"):
        check_launch(smoke("ppo.mixed_precision=bf16"), _state())
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="accelerate launch's mixed_precision=bf16 needs a CPU with native"):
        check_launch(smoke(), _state())
    check_launch(smoke("ppo.mixed_precision=no"), _state())  # float32 needs nothing
    check_launch(smoke("ppo.mixed_precision=bf16"), _state(device="cuda"))  # a GPU is not asked about the CPU


def test_launcher_mixed_precision_is_checked_and_named(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert mixed_precision_of(smoke()) == ("fp16", "accelerate launch's mixed_precision=fp16")
    with pytest.raises(ConfigError, match="accelerate launch's mixed_precision=fp16 needs a GPU"):
        check_launch(smoke(), _state())
    # The config key, when set, wins over the launcher.
    assert mixed_precision_of(smoke("ppo.mixed_precision=no"))[0] == "no"
    check_launch(smoke("ppo.mixed_precision=no"), _state())


def test_bf16_on_a_gpu_without_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(components, "is_bf16_available", lambda ignore_tpu=False: False)
    with pytest.raises(ConfigError, match="needs bfloat16 support, which this cuda device lacks"):
        check_launch(smoke("ppo.mixed_precision=bf16"), _state(device="cuda"))


def test_fp16_mixed_precision_with_fp16_weights_is_refused():
    with pytest.raises(ConfigError, match="model.dtype=float16.*Set model.dtype=float32"):
        check_launch(smoke("ppo.mixed_precision=fp16", "model.dtype=float16"), _state(device="cuda"))


def test_lora_without_peft_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"model.lora.enabled=true needs the 'peft' package.*pip install peft"):
        check_launch(smoke("model.lora.enabled=true"), _state())
    check_launch(smoke(), _state())  # without LoRA peft is not needed


def test_zero3_and_fsdp1_are_refused_before_training_and_fsdp2_passes(monkeypatch):
    """ZeRO-3 and FSDP version 1 are refused up front, pointing to FSDP2; ZeRO-2 and FSDP2 pass."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    for overrides in ((), ("model.lora.enabled=true",)):
        with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3.*FSDP2.*deepspeed_zero2.yaml"):
            check_launch(smoke(*overrides), _state(2))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_launch(smoke(), _state(2))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1.*fsdp_version: 2"):
        check_launch(smoke(), _state(2))
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_launch(smoke(), _state(2))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("ppo.sharding=fsdp2", "model.lora.enabled=true"), r"ppo.sharding=fsdp2 with model.lora.enabled=true is not supported"),
        (("ppo.sharding=fsdp2", "ppo.mixed_precision=bf16"), r"ppo.sharding=fsdp2 with ppo.mixed_precision=bf16.*ppo.precision=bf16"),
    ],
)
def test_fsdp2_combinations_it_does_not_cover_are_refused_in_one_paragraph(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as refusal:
        check_launch(smoke(*overrides), _state(2))
    assert "\n" not in str(refusal.value)


def test_launch_state_of_a_plain_process_is_one_cpu_process():
    state = launch_state()
    assert state.num_processes == 1 and state.process_index == 0
