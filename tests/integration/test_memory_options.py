"""Memory options: LoRA through PEFT (no second model), gradient checkpointing with the value head,
bf16 mixed precision through Accelerate (on the CPU here)."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from omegaconf import OmegaConf

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.config.schema import LoraSection, ModelConfig
from rlhf_cli.engine.components import settings_and_launch
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import load_policy_and_tokenizer
from rlhf_cli.ppo.forward import score_rollout
from rlhf_cli.rollout.packing import pack_batch
from tests.tiny import make_tiny_gpt2
from tests.tolerances import assert_same_update

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (the shared ``one_thread`` fixture)."""


def _batch(n: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    return queries, responses, [float(s) for s in torch.randn(n, generator=gen)]


def _model_cfg(model_dir, **lora):
    """The model group for the tiny GPT-2 saved in ``model_dir``, with ``lora`` settings (enabled if any)."""
    lora_section = LoraSection(enabled=bool(lora), **lora)
    return OmegaConf.structured(ModelConfig(source="pretrained", name_or_path=str(model_dir), lora=lora_section))


def _held_bytes(trainer: PPOTrainer) -> int:
    """Bytes of every distinct parameter storage the trainer's policy and reference hold."""
    modules = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()}
    return sum(storages.values())


def _optimizer_state_bytes(trainer: PPOTrainer) -> int:
    return sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.fixture(scope="module")
def lora_run(tiny_gpt2_dir):
    """A LoRA policy from the config (model.lora), one PPO step, and the same model without LoRA."""
    torch.manual_seed(0)  # the value head's init
    policy, tokenizer = load_policy_and_tokenizer(_model_cfg(tiny_gpt2_dir, target_modules=["c_attn", "c_proj"]))
    base, _ = load_policy_and_tokenizer(_model_cfg(tiny_gpt2_dir))  # the LoRA policy's base model
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2), policy, tokenizer=tokenizer)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    batch = _batch(4, len(tokenizer))
    packed = pack_batch(batch[0], batch[1], pad_token_id=tokenizer.pad_token_id, is_encoder_decoder=False)
    rollout = score_rollout(trainer.model, trainer.reference_context, packed, chunk_size=4, need_full_kl=False)
    base_rollout = score_rollout(base, base, packed, chunk_size=4, need_full_kl=False)
    trainer.step(*batch)
    return dict(trainer=trainer, before=before, rollout=rollout, base_rollout=base_rollout, tokenizer=tokenizer)


def test_lora_config_puts_adapters_on_the_named_modules(lora_run):
    trainer = lora_run["trainer"]
    assert trainer.is_peft_model and trainer.ref_model is None  # no second model
    lora_config = trainer.model.pretrained_model.peft_config["default"]
    assert (lora_config.r, lora_config.lora_alpha, set(lora_config.target_modules)) == (8, 16, {"c_attn", "c_proj"})
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)


def test_lora_step_trains_only_adapter_and_value_head_weights(lora_run):
    trainer, before = lora_run["trainer"], lora_run["before"]
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert any("lora_" in n for n in changed) and any(n.startswith("v_head.") for n in changed)
    assert all("lora_" in n or n.startswith("v_head.") for n in changed)


def test_lora_reference_logprobs_are_the_base_models(lora_run):
    # The adapters start at B = 0: the policy equals its base at first, and the reference always does.
    torch.testing.assert_close(lora_run["rollout"].ref_logprobs, lora_run["base_rollout"].logprobs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lora_run["rollout"].logprobs, lora_run["base_rollout"].logprobs, atol=1e-6, rtol=1e-6)
    tokenizer = lora_run["tokenizer"]
    queries, responses, _ = _batch(4, len(tokenizer))
    packed = pack_batch(queries, responses, pad_token_id=tokenizer.pad_token_id, is_encoder_decoder=False)
    after = score_rollout(lora_run["trainer"].model, lora_run["trainer"].reference_context, packed, chunk_size=4, need_full_kl=False)
    torch.testing.assert_close(after.ref_logprobs, lora_run["base_rollout"].logprobs, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(after.logprobs, after.ref_logprobs)  # the trained adapters moved the policy


def test_lora_holds_about_half_the_parameter_memory_of_policy_plus_reference(lora_run, tiny_gpt2_dir):
    lora_trainer = lora_run["trainer"]
    policy, tokenizer = load_policy_and_tokenizer(_model_cfg(tiny_gpt2_dir))
    full_trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2), policy, tokenizer=tokenizer)
    full_trainer.step(*_batch(4, len(tokenizer)))
    base_bytes = sum(p.numel() * p.element_size() for p in full_trainer.model.parameters())
    assert _held_bytes(full_trainer) == pytest.approx(2 * base_bytes, rel=0.01)  # policy + frozen copy
    # LoRA: the base once plus small adapters, and optimiser state for the adapters and head only.
    assert _held_bytes(lora_trainer) < 0.6 * _held_bytes(full_trainer)
    assert _optimizer_state_bytes(lora_trainer) < 0.1 * _optimizer_state_bytes(full_trainer)


def test_lora_target_module_that_does_not_exist_is_a_config_error(tiny_gpt2_dir):
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        load_policy_and_tokenizer(_model_cfg(tiny_gpt2_dir, target_modules=["no_such_layer"]))


def test_empty_lora_target_list_is_rejected_at_composition():
    with pytest.raises(ConfigError, match="model.lora.target_modules.*empty"):
        compose_train_config(["model.lora.target_modules=[]"])


def test_lora_keys_compose_from_the_command_line():
    lora = compose_train_config(["model.lora.enabled=true", "model.lora.r=4", "model.lora.target_modules=[c_attn]"]).model.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout, list(lora.target_modules)) == (True, 4, 16, 0.0, ["c_attn"])


def _saved_activation_bytes(policy, batch) -> int:
    """Bytes autograd keeps for backward during one training forward pass of ``policy`` over ``batch``."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    policy.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        policy(**batch.model_inputs())[0].sum().backward()
    return sum(saved)


def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_step(word_tokenizer):
    def run(checkpointing: bool):
        policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, n_layer=4, seed=2))
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        queries, responses, scores = _batch(4, len(word_tokenizer), seed=3)
        saved = _saved_activation_bytes(policy, pack_batch(queries, responses, pad_token_id=0, is_encoder_decoder=False))
        policy.zero_grad()
        sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, seed=1), policy, tokenizer=word_tokenizer, optimizer=sgd)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.step(queries, responses, scores)
        return initial, trainer.model.state_dict(), saved, trainer.model.pretrained_model.is_gradient_checkpointing

    initial, plain, plain_saved, plain_flag = run(False)
    _, checkpointed, checkpointed_saved, flag = run(True)
    assert flag and not plain_flag
    assert checkpointed_saved < 0.5 * plain_saved  # only block inputs are kept; the rest is recomputed
    # 8 SGD updates; the recomputed forward may round differently: compared relative to the updates.
    assert_same_update(initial, plain, checkpointed, what="gradient checkpointing vs plain")


def test_gradient_checkpointing_from_the_model_config_with_lora(tiny_gpt2_dir):
    cfg = _model_cfg(tiny_gpt2_dir, r=4)
    cfg.gradient_checkpointing = True
    policy, tokenizer = load_policy_and_tokenizer(cfg)
    assert policy.pretrained_model.is_gradient_checkpointing
    trainer = PPOTrainer(PPOConfig(batch_size=2, learning_rate=1e-2), policy, tokenizer=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.step(*_batch(2, len(tokenizer), seed=4))
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_mixed_precision_key_reaches_the_accelerator():
    cfg = compose_train_config(["+recipe=smoke", "ppo.mixed_precision=bf16"])
    assert settings_and_launch(cfg, num_processes=1, tracker_dir="unused")[1].accelerator_kwargs == {"mixed_precision": "bf16"}
    cfg = compose_train_config(["+recipe=smoke"])
    assert cfg.ppo.mixed_precision is None
    assert settings_and_launch(cfg, num_processes=1, tracker_dir="unused")[1].accelerator_kwargs == {}


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change once set."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_on_cpu_runs_policy_and_reference_in_the_same_precision(word_tokenizer, fresh_accelerator_state):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, seed=4))
    fp32_policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, seed=4))
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2, accelerator_kwargs={"mixed_precision": "bf16"})
    trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer)
    assert trainer.accelerator.mixed_precision == "bf16"
    queries, responses, scores = _batch(4, len(word_tokenizer), seed=5)
    packed = pack_batch(queries, responses, pad_token_id=0, is_encoder_decoder=False)
    rollout = score_rollout(trainer.model, trainer.reference_context, packed, chunk_size=4, need_full_kl=False)
    exact = score_rollout(fp32_policy, fp32_policy, packed, chunk_size=4, need_full_kl=False)
    mask = packed.response_mask.bool()
    # bf16 matmuls really ran (logprobs moved by rounding), in the reference as in the policy (KL exactly 0).
    assert not torch.equal(rollout.logprobs[mask], exact.logprobs[mask])
    torch.testing.assert_close(rollout.logprobs[mask], exact.logprobs[mask], atol=0.1, rtol=0)  # padding: any value
    assert torch.equal(rollout.ref_logprobs[mask], rollout.logprobs[mask])
    stats = trainer.step(queries, responses, scores)
    assert stats["objective/kl"] == 0.0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # float32 master weights
    assert torch.isfinite(torch.tensor(stats["ppo/loss/total"]))
