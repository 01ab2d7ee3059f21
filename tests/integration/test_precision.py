"""precision=bf16: bfloat16 compute, float32 master weights and Adam moments (rlhf_cli.ppo.precision)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo import precision as precision_module
from rlhf_cli.ppo.precision import MasterWeightOptimizer
from tests.tiny import make_tiny_gpt2

BATCH = 4
# bf16 vs fp32 on the tiny model after one step: bf16 keeps 8 mantissa bits (relative rounding 2^-9 per
# operation); the step's statistics are sums over a few hundred such roundings, and 2e-2 of their scale
# (plus 2e-3 absolute for the ones near zero) is ~10x what this model shows and ~10x below what a wrong
# precision path (float32 old logprobs against bfloat16 new ones, or masters never updated) gives.
STAT_TOLERANCE = {"rel": 2e-2, "abs": 2e-3}


def _batch(vocab: int, seed: int = 1, n: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    queries = [torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    responses = [torch.randint(3, vocab, (6,), generator=gen) for _ in range(n)]
    scores = [torch.tensor(float(s)) for s in torch.randn(n, generator=gen)]
    return queries, responses, scores


def _trainer(tokenizer, precision: str, **overrides) -> PPOTrainer:
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer, seed=0))
    kwargs = dict(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, precision=precision)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No dataset was given")
        return PPOTrainer(PPOConfig(**kwargs), model, tokenizer=tokenizer)


def _master_optimizer(trainer: PPOTrainer) -> MasterWeightOptimizer:
    return trainer.optimizer.optimizer  # Accelerate's AcceleratedOptimizer wraps ours


def test_masters_are_fp32_adam_on_the_bf16_gradients_and_weights_are_masters_rounded(word_tokenizer, one_thread):
    """After 2 steps × 2 epochs × 2 mini-batches (8 optimiser steps) the masters equal, bit for bit, a
    separate float32 Adam fed the gradients the bfloat16 backward produced; the model's weights are
    the masters rounded to bfloat16."""
    trainer = _trainer(word_tokenizer, "bf16")
    opt = _master_optimizer(trainer)
    params = [p for group in opt.param_groups for p in group["params"]]
    initial = [p.detach().clone() for p in params]
    assert all(p.dtype == torch.float32 for p in params)
    recorded: list[list[torch.Tensor]] = []
    opt.inner.register_step_pre_hook(lambda *_: recorded.append([p.grad.clone() for p in params]))
    for seed in (1, 2):
        trainer.step(*_batch(len(word_tokenizer), seed))
    assert len(recorded) == 8

    bf16_weights = {id(w) for w, _ in opt.pairs}
    for grads in recorded:  # the language model's gradients come from the bfloat16 backward pass
        for p, g in zip(params, grads):
            if id(p) in {id(m) for _, m in opt.pairs}:
                assert torch.equal(g, g.to(torch.bfloat16).float())
    reference_params = [p.clone().requires_grad_(True) for p in initial]
    reference = torch.optim.Adam(reference_params, lr=1e-3, eps=1e-8, fused=True)
    for grads in recorded:
        for p, g in zip(reference_params, grads):
            p.grad = g
        reference.step()
    for p, ref in zip(params, reference_params):
        assert torch.equal(p, ref)
    for weight, master in opt.pairs:
        assert weight.dtype == torch.bfloat16 and id(weight) in bf16_weights
        assert torch.equal(weight, master.to(torch.bfloat16))
    # The masters carry what bfloat16 cannot hold: the point of keeping them.
    assert any(not torch.equal(w.float(), m) for w, m in opt.pairs)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    # Every language-model weight computes in bfloat16, the reference too; the value head stays float32.
    assert {p.dtype for p in trainer.model.pretrained_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.ref_model.pretrained_model.parameters()} == {torch.bfloat16}
    assert trainer.model.v_head.summary.weight.dtype == torch.float32


def _first_minibatch_ratio(tokenizer, **overrides) -> dict:
    trainer = _trainer(tokenizer, "bf16", mini_batch_size=BATCH, ppo_epochs=1, **overrides)
    return trainer.step(*_batch(len(tokenizer)))


def test_first_minibatch_ratio_is_one_in_bf16(word_tokenizer, one_thread):
    """Old logprobs come from the same bfloat16 weights as the training forward: with one mini-batch
    of the whole batch, the ratio is 1 and the approximate KL 0 (float32 old logprobs against
    bfloat16 new ones would be ~1e-2 apart, see the control below)."""
    stats = _first_minibatch_ratio(word_tokenizer)
    assert abs(float(stats["ppo/policy/ratio"]) - 1.0) < 1e-6
    assert abs(float(stats["ppo/policy/approxkl"])) < 1e-10
    assert float(stats["objective/kl"]) == 0.0  # bfloat16 reference == bfloat16 policy before training

    # Control: the test would see a float32/bfloat16 mismatch.
    model = make_tiny_gpt2(word_tokenizer, seed=0)
    ids = torch.cat(_batch(len(word_tokenizer))[1]).view(BATCH, -1)
    with torch.no_grad():
        fp32 = torch.log_softmax(model(ids).logits.float(), -1)
        bf16 = torch.log_softmax(model.to(torch.bfloat16)(ids).logits.float(), -1)
    assert (fp32 - bf16).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["gradient_checkpointing", "lora"])
def test_bf16_with_gradient_checkpointing_and_lora(word_tokenizer, one_thread, variant):
    """The mode composes with gradient checkpointing and with LoRA (masters only for the adapters)."""
    if variant == "lora":
        if importlib.util.find_spec("peft") is None:
            pytest.skip("peft is not installed")
        import peft

        base = make_tiny_gpt2(word_tokenizer, seed=0)
        lm = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"]))
        model = AutoModelForCausalLMWithValueHead.from_pretrained(lm)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No dataset was given")
            trainer = PPOTrainer(
                PPOConfig(batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=1, learning_rate=1e-3, precision="bf16"),
                model,
                tokenizer=word_tokenizer,
            )
        assert trainer.ref_model is None  # the reference is the adapter-less policy, in bfloat16 too
    else:
        trainer = _trainer(word_tokenizer, "bf16", mini_batch_size=BATCH, ppo_epochs=1, gradient_checkpointing=True)
    opt = _master_optimizer(trainer)
    before = [m.clone() for _, m in opt.pairs]
    trainable = sum(p.numel() for p in trainer.model.pretrained_model.parameters() if p.requires_grad)
    assert sum(m.numel() for m in before) == trainable
    stats = trainer.step(*_batch(len(word_tokenizer)))
    assert abs(float(stats["ppo/policy/ratio"]) - 1.0) < 1e-6
    assert any(not torch.equal(b, m) for b, (_, m) in zip(before, opt.pairs))  # it learned
    for weight, master in opt.pairs:
        assert torch.equal(weight, master.to(torch.bfloat16))


def test_bf16_step_stats_agree_with_fp32(word_tokenizer, one_thread):
    """Same model, data and seed: the first step's statistics in bf16 agree with fp32 to STAT_TOLERANCE."""
    batch = _batch(len(word_tokenizer))
    fp32 = _trainer(word_tokenizer, "fp32").step(*batch)
    bf16 = _trainer(word_tokenizer, "bf16").step(*batch)
    for key in (
        "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/ratio", "ppo/returns/mean",
        "ppo/val/vpred", "ppo/val/error", "ppo/policy/approxkl", "objective/entropy", "ppo/mean_scores",
    ):
        assert float(bf16[key]) == pytest.approx(float(fp32[key]), **STAT_TOLERANCE), key
    assert torch.tensor(bf16["objective/logprobs"]).float() == pytest.approx(
        torch.tensor(fp32["objective/logprobs"]).float(), **STAT_TOLERANCE
    )


def test_state_dict_round_trip_restores_masters_and_moments(word_tokenizer, one_thread):
    """What a checkpoint saves (trainer.state_dict) brings a fresh bf16 trainer to the same masters,
    moments and bfloat16 weights; a float32 optimiser state is refused with the fix named."""
    trainer = _trainer(word_tokenizer, "bf16")
    trainer.step(*_batch(len(word_tokenizer)))
    state = trainer.state_dict()
    fresh = _trainer(word_tokenizer, "bf16")
    fresh.load_state_dict(state)
    for (w, m), (w2, m2) in zip(_master_optimizer(trainer).pairs, _master_optimizer(fresh).pairs):
        assert torch.equal(m, m2) and torch.equal(w, w2)
    a, b = _master_optimizer(trainer).state, _master_optimizer(fresh).state
    assert all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]) for x, y in zip(a.values(), b.values()))
    fp32_state = _trainer(word_tokenizer, "fp32").state_dict()
    with pytest.raises(ValueError, match="resume with the precision the checkpoint was made with"):
        fresh.load_state_dict(fp32_state)


# Errors: before any model loads --------------------------------------------------------------------
def _cfg(**ppo):
    base = {"precision": "fp32", "mixed_precision": None, **ppo}
    return OmegaConf.create({"ppo": base, "model": {"dtype": "float32"}})


def test_bf16_on_a_cpu_without_bfloat16_names_fp32(monkeypatch):
    from rlhf_cli.engine.components import check_precision

    monkeypatch.setattr(precision_module, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError, match="Use ppo.precision=fp32"):
        check_precision(_cfg(precision="bf16"), "cpu")
    check_precision(_cfg(precision="fp32"), "cpu")  # fp32 needs nothing


def test_bf16_precision_with_mixed_precision_is_refused(monkeypatch):
    from rlhf_cli.config.compose import compose_train_config

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(ConfigError, match="ppo.mixed_precision=no"):
        compose_train_config(["ppo.precision=bf16", "ppo.mixed_precision=bf16"])
    # The library gets the same rule in its own words (it used to say only "drop mixed_precision").
    with pytest.raises(ValueError, match=r"accelerator_kwargs\['mixed_precision'\]=no"):
        PPOConfig(precision="bf16", accelerator_kwargs={"mixed_precision": "bf16"})
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        PPOConfig(precision="fp16")


def test_the_cli_refuses_bf16_with_mixed_precision_before_loading_anything(tmp_path):
    """`rlhf train` stops with exit code 2 and one paragraph naming both fixes; nothing of a run is written."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "rlhf_cli", "train", "+recipe=smoke", f"output_dir={out}",
               "ppo.precision=bf16", "ppo.mixed_precision=bf16"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "ppo.precision=bf16 with ppo.mixed_precision=no" in message and "Traceback" not in done.stderr
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
