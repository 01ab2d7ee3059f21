"""ppo.precision=auto: bf16 where the device computes bfloat16 natively, fp32 elsewhere with a one-line
notice; resolved once before any model loads, and a resumed run keeps its checkpoint's precision.

The device's capability is faked (the CPU flags, CUDA's answer), so both branches run on any machine.
"""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.engine.components import with_resolved_precision
from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo import precision
from rlhf_cli.ppo.precision import bf16_is_fast, resolve_precision


@functools.lru_cache(maxsize=None)
def smoke(*overrides: str):
    return compose_train_config(["+recipe=smoke", *overrides])


def _cpu(monkeypatch, flags):
    """Fake this CPU's /proc/cpuinfo flags (None: unreadable; oneDNN then says yes) and oneDNN's bf16
    answer (yes with any AVX-512 or AMX, as torch's check)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: None if flags is None else set(flags))
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: flags is None or any(f.startswith(("avx512", "amx")) for f in flags))


@pytest.mark.parametrize(
    ("flags", "fast"),
    [({"avx2"}, False), ({"avx512f", "avx512bw"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
     (None, True)],  # no /proc/cpuinfo: oneDNN's own check (faked True here)
)
def test_a_cpu_is_fast_at_bf16_with_avx512_bf16_or_amx(monkeypatch, flags, fast):
    _cpu(monkeypatch, flags)
    assert bf16_is_fast("cpu") is fast


@pytest.mark.parametrize("supported", [True, False])
def test_a_gpu_is_fast_at_bf16_when_cuda_says_so(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert bf16_is_fast("cuda") is supported
    assert resolve_precision("auto", "cuda")[0] == ("bf16" if supported else "fp32")


def test_auto_is_bf16_on_a_fast_cpu_without_a_notice(monkeypatch):
    _cpu(monkeypatch, {"amx_bf16"})
    assert resolve_precision("auto", "cpu") == ("bf16", None)


def test_auto_falls_back_to_fp32_with_a_one_line_notice(monkeypatch):
    _cpu(monkeypatch, {"avx2"})
    resolved, notice = resolve_precision("auto", "cpu")
    assert resolved == "fp32"
    assert "\n" not in notice and notice.startswith("ppo.precision=auto: training in fp32")
    assert "AVX-512 BF16 or AMX" in notice


@pytest.mark.parametrize("explicit", ["fp32", "bf16"])
def test_an_explicit_precision_is_never_changed(monkeypatch, explicit):
    _cpu(monkeypatch, {"avx2"})
    assert resolve_precision(explicit, "cpu") == (explicit, None)
    assert resolve_precision(explicit, "cpu", saved="fp32" if explicit == "bf16" else "bf16") == (explicit, None)


def test_the_run_config_records_the_resolved_value_and_the_notice_is_printed_once(monkeypatch):
    _cpu(monkeypatch, {"avx2"})
    printed = []
    cfg = with_resolved_precision(smoke("ppo.precision=auto"), "cpu", None, printed.append)
    assert cfg.ppo.precision == "fp32" and len(printed) == 1
    assert "precision: fp32" in OmegaConf.to_yaml(cfg) and OmegaConf.is_readonly(cfg)
    _cpu(monkeypatch, {"amx_bf16"})
    assert with_resolved_precision(smoke("ppo.precision=auto"), "cpu", None, printed.append).ppo.precision == "bf16"
    assert len(printed) == 1  # bf16 where it is fast: nothing to say


def test_a_resumed_run_keeps_its_checkpoints_precision(monkeypatch):
    """Trained in fp32 on a machine without fast bf16, resumed on one with it: still fp32 (the
    optimiser state has no float32 masters), with a notice; and the other way round, bf16 stays bf16
    on a CPU that runs bfloat16 (plain AVX-512)."""
    printed = []
    _cpu(monkeypatch, {"amx_bf16"})
    cfg = with_resolved_precision(smoke("ppo.precision=auto"), "cpu", smoke("ppo.precision=fp32"), printed.append)
    assert cfg.ppo.precision == "fp32" and "resuming in fp32" in printed[-1]
    _cpu(monkeypatch, {"avx512f"})
    cfg = with_resolved_precision(smoke("ppo.precision=auto"), "cpu", smoke("ppo.precision=bf16"), printed.append)
    assert cfg.ppo.precision == "bf16" and "resuming in bf16" in printed[-1]


def test_a_resumed_bf16_run_on_a_cpu_without_bf16_is_refused(monkeypatch):
    _cpu(monkeypatch, {"avx2"})
    with pytest.raises(ConfigError, match=r"ppo.precision=auto resumes with the checkpoint's precision, bf16.*"
                                          r"Resume it on a machine with native bfloat16"):
        with_resolved_precision(smoke("ppo.precision=auto"), "cpu", smoke("ppo.precision=bf16"), lambda line: None)


def test_auto_with_autocast_is_refused_at_composition():
    with pytest.raises(ConfigError, match=r"ppo.precision=auto computes in bfloat16.*ppo.mixed_precision=bf16.*"
                                          r"ppo.precision=fp32 with ppo.mixed_precision=bf16"):
        compose_train_config(["+recipe=smoke", "ppo.precision=auto", "ppo.mixed_precision=bf16"])


def test_auto_is_a_command_line_value_only():
    """The engine and TRL's PPOConfig get a resolved precision: the library refuses auto."""
    from rlhf_cli import PPOConfig

    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, got 'auto'"):
        PPOConfig(precision="auto")


def test_the_smollm2_recipe_asks_for_auto_without_autocast():
    cfg = compose_train_config(["+recipe=smollm2_imdb"])
    assert cfg.ppo.precision == "auto" and cfg.ppo.mixed_precision is None
