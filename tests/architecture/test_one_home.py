"""Each rule of the PPO settings has one home: the command line and the library refuse exactly the same values.

A table of settings (every range and enumeration of PPOSettings, generated from its metadata, just
outside and on the edge; then every cross-field rule) goes through both callers: the command line's
validator on the composed offline default config (``ppo.NAME`` keys, global sizes), and TRL's
``PPOConfig`` built from the same values (field names, per-process sizes).
"""

from __future__ import annotations

import copy
import re

import pytest
from omegaconf import OmegaConf

from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.config.engine_settings import check_engine_settings, engine_values
from rlhf_cli.config.validate import validate
from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo.settings import settings_fields
from rlhf_cli.trl.config import PPOConfig

BASE = compose_train_config()  # the offline default: batch 32, mini-batch 16, one response per prompt
# Where an engine setting lives on the command line, when not at ppo.NAME.
CLI_KEYS = {"samples_per_prompt": "generation.samples_per_prompt", "seed": "seed",
            "gradient_checkpointing": "model.gradient_checkpointing", "peft_model": "model.lora.enabled"}


def _range_cases() -> list[tuple[dict, bool]]:
    """(settings, must be refused) for every range and enumeration of PPOSettings: a value just
    outside (refused) and one on the edge (as the other rules decide)."""
    cases = []
    for f in settings_fields():
        meta, integer = f.metadata, "int" in f.type
        if "choices" in meta:
            cases += [({f.name: "nope"}, True), ({f.name: meta["choices"][-1]}, None)]
        if "ge" in meta:
            cases += [({f.name: meta["ge"] - (1 if integer else 0.5)}, True), ({f.name: meta["ge"]}, None)]
        if "gt" in meta:
            cases += [({f.name: meta["gt"]}, True), ({f.name: meta["gt"] + (1 if integer else 0.5)}, None)]
        if "le" in meta:
            cases += [({f.name: meta["le"] + 0.5}, True), ({f.name: meta["le"]}, None)]
    return cases


CROSS_FIELD = [
    ({"mini_batch_size": 64}, True),  # a mini-batch larger than the batch
    ({"batch_size": 48, "mini_batch_size": 16, "gradient_accumulation_steps": 2}, True),  # 48 % 32
    ({"batch_size": 64, "mini_batch_size": 16, "gradient_accumulation_steps": 2}, False),
    ({"batch_size": 30, "samples_per_prompt": 4, "mini_batch_size": 2}, True),  # groups straddle steps
    ({"batch_size": 32, "samples_per_prompt": 4}, False),
    ({"advantage_estimator": "grpo"}, True),  # a group of one
    ({"advantage_estimator": "rloo", "samples_per_prompt": 2}, False),
    ({"advantage_estimator": "reinforce_pp"}, False),
    ({"precision": "bf16", "mixed_precision": "bf16"}, True),  # autocast on bf16 weights
    ({"precision": "bf16", "mixed_precision": "fp16"}, True),
    ({"precision": "bf16", "mixed_precision": "no"}, False),
    ({"precision": "fp32", "mixed_precision": "bf16"}, False),
    ({"use_score_norm": True}, True),  # normalisation without scaling
    ({"use_score_norm": True, "use_score_scaling": True}, False),
    # What FSDP2 does not cover yet: a LoRA/PEFT policy, Accelerate's autocast (FSDP2 has its own policy).
    ({"sharding": "fsdp2", "peft_model": True}, True),
    ({"sharding": "none", "peft_model": True}, False),
    ({"sharding": "fsdp2", "mixed_precision": "bf16"}, True),
    ({"sharding": "fsdp2", "mixed_precision": "fp16"}, True),
    ({"sharding": "fsdp2", "precision": "bf16", "mixed_precision": "no"}, False),
    ({"sharding": "fsdp2"}, False),
]


def _cli_check(settings: dict, processes: int = 1) -> None:
    cfg = copy.deepcopy(BASE)
    for name, value in settings.items():
        OmegaConf.update(cfg, CLI_KEYS.get(name, f"ppo.{name}"), value)
    validate(cfg)  # composition's validation: ranges, then every rule for the launch's processes (1 here)
    check_engine_settings(cfg, processes)  # the launch check, with the launch's real processes


def _cli_refuses(settings: dict, processes: int = 1) -> bool:
    try:
        _cli_check(settings, processes)
    except ConfigError:
        return True
    return False


def _library_refuses(settings: dict, processes: int = 1) -> bool:
    """PPOConfig from the same values, per process (the command line's global sizes divided)."""
    values = {**engine_values(BASE), **settings}
    for key in ("batch_size", "mini_batch_size"):
        values[key] = values[key] // processes if isinstance(values[key], int) else values[key]
    mixed = values.pop("mixed_precision", None)
    peft_model = values.pop("peft_model", None)
    try:
        PPOConfig(**values, accelerator_kwargs={"mixed_precision": mixed} if mixed else {}, is_peft_model=peft_model)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(("settings", "refused"), _range_cases() + CROSS_FIELD, ids=repr)
def test_the_command_line_and_the_library_refuse_the_same_settings(settings, refused):
    cli, library = _cli_refuses(settings), _library_refuses(settings)
    assert cli == library, f"command line refuses: {cli}, library refuses: {library}"
    if refused is not None:
        assert cli is refused


@pytest.mark.parametrize(
    ("settings", "refused"),
    [({"batch_size": 12, "samples_per_prompt": 4, "mini_batch_size": 4}, True),  # 6 per process: groups straddle
     ({"batch_size": 16, "samples_per_prompt": 4, "mini_batch_size": 4}, False)],
    ids=repr,
)
def test_groups_per_process_are_one_rule_for_both(settings, refused):
    """On two processes the command line's global sizes are the library's halved; a group that would
    straddle two processes is a group that straddles a per-process step."""
    assert _cli_refuses(settings, processes=2) is refused
    assert _library_refuses(settings, processes=2) is refused


def test_the_range_table_covers_every_knob_with_a_range():
    ranged = {f.name for f in settings_fields() if f.metadata}
    assert ranged == {name for settings, _ in _range_cases() for name in settings}
    assert len(ranged) >= 25


def test_an_fsdp2_launch_is_sharding_for_both_and_named_as_the_launch(monkeypatch):
    """Accelerate's FSDP config at fsdp_version: 2 means sharding=fsdp2 without the setting: the command
    line and the engine (the library's trainer) refuse the same combinations, naming the launch."""
    import types

    from rlhf_cli.ppo.settings import FSDP2_LAUNCH, Launch, PPOSettings
    from rlhf_cli.ppo.setup import check_engine_arguments

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match=re.escape(f"{FSDP2_LAUNCH} with model.lora.enabled=true")) as cli:
        _cli_check({"peft_model": True})
    with pytest.raises(ValueError, match=re.escape(f"{FSDP2_LAUNCH} with a PEFT model")) as library:
        check_engine_arguments(PPOSettings(), Launch(), types.SimpleNamespace(is_peft_model=True))
    assert "\n" not in str(cli.value) and "\n" not in str(library.value)
    check_engine_arguments(PPOSettings(), Launch(), types.SimpleNamespace(is_peft_model=False))
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP1 is refused by the launch check, not read as FSDP2
    check_engine_arguments(PPOSettings(), Launch(), types.SimpleNamespace(is_peft_model=True))


def test_the_trainer_refuses_a_peft_policy_under_fsdp2_before_sharding(word_tokenizer):
    """The library's refusal of LoRA under FSDP2 comes from the same rule, before anything is sharded."""
    peft = pytest.importorskip("peft")
    from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOTrainer
    from tests.tiny import make_tiny_gpt2

    lora = peft.get_peft_model(make_tiny_gpt2(word_tokenizer), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(lora)
    with pytest.raises(ValueError, match=r"sharding=fsdp2 with a PEFT model .* not supported yet.*sharding=none"):
        PPOTrainer(PPOConfig(batch_size=2, sharding="fsdp2"), policy, tokenizer=word_tokenizer)
