"""generation_model / synced_generation_kwargs: what each distributed type gets for generate()."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate.utils import DistributedType

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.errors import ConfigError
from rlhf_cli.rollout.unwrap import generation_model, synced_generation_kwargs, zero_stage
from tests.tiny import make_tiny_gpt2


def _fake_accelerator(distributed_type, *, num_processes=2, stage=None, fsdp2=False):
    """The attributes generation_model reads, for launch types this CPU machine cannot create."""
    plugin = types.SimpleNamespace(zero_stage=stage) if stage is not None else None
    return types.SimpleNamespace(
        distributed_type=distributed_type,
        num_processes=num_processes,
        is_fsdp2=fsdp2,
        state=types.SimpleNamespace(deepspeed_plugin=plugin),
        unwrap_model=lambda model: model.module,
    )


def test_plain_accelerator_yields_the_unwrapped_model_without_extra_kwargs(word_tokenizer):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer))
    trainer = PPOTrainer(PPOConfig(batch_size=2), policy, tokenizer=word_tokenizer)
    with generation_model(trainer.accelerator, trainer.model) as model:
        assert model is trainer.accelerator.unwrap_model(trainer.model)
    assert synced_generation_kwargs(trainer.accelerator) == {} and zero_stage(trainer.accelerator) is None
    responses = trainer.generate([torch.tensor([5, 6, 7])], max_new_tokens=3, do_sample=False, return_prompt=False)
    assert len(responses) == 1 and 1 <= len(responses[0]) <= 3


@pytest.mark.parametrize(
    ("accelerator", "synced"),
    [
        (_fake_accelerator(DistributedType.MULTI_GPU), False),
        (_fake_accelerator(DistributedType.DEEPSPEED, stage=2), False),
        (_fake_accelerator(DistributedType.DEEPSPEED, stage=3), True),
        (_fake_accelerator(DistributedType.DEEPSPEED, stage=3, num_processes=1), False),
        (_fake_accelerator(DistributedType.FSDP), True),
    ],
)
def test_sharded_parameters_generate_in_lockstep(accelerator, synced):
    assert synced_generation_kwargs(accelerator) == ({"synced_gpus": True} if synced else {})


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_yields_the_unwrapped_module(stage):
    wrapped = types.SimpleNamespace(module=torch.nn.Linear(2, 2))
    with generation_model(_fake_accelerator(DistributedType.DEEPSPEED, stage=stage), wrapped) as model:
        assert model is wrapped.module


def test_fsdp2_generation_of_a_model_the_trainer_did_not_shard_is_refused():
    """The trainer shards with rlhf_cli.ppo.sharding; a model it did not shard cannot generate under FSDP2."""
    wrapped = types.SimpleNamespace(module=torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="FSDP2 launch whose model the trainer did not shard"):
        with generation_model(_fake_accelerator(DistributedType.FSDP, fsdp2=True), wrapped):
            pass


def test_zero3_with_a_separate_reference_is_refused_by_the_trainer(word_tokenizer, monkeypatch):
    monkeypatch.setattr("rlhf_cli.ppo.setup.zero_stage", lambda accelerator: 3)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer))
    with pytest.raises(ConfigError, match="ZeRO-3.*LoRA"):
        PPOTrainer(PPOConfig(batch_size=2), policy, tokenizer=word_tokenizer)
