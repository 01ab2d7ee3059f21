"""Fixed rollouts and trainer settings shared by the 2-process harness and the 1-process reference.

Sizes are global (both processes together); :func:`make_trainer` divides them by the number of
processes. Process r receives rows r·b … (r+1)·b − 1 of each global batch, and the 1-process
reference receives the whole batch in this order (the convention of ``rlhf_cli.ppo.distributed``).

Grouped scenarios (``samples_per_prompt`` G > 1) lay the global batch out prompt-major, as
``PPOTrainer.step`` takes it: rows g·G … g·G + G − 1 are the G responses of prompt g, so process r's
rows are whole groups exactly when b is a multiple of G (:func:`run_steps` asserts it).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from tests.tiny import make_tiny_gpt2, make_word_tokenizer

GLOBAL_BATCH = 8
STEPS = 2

# name -> (global PPOConfig sizes and knobs, optimizer, LoRA). Plain SGD where weights are compared
# tightly: Adam divides by the root of tiny second moments, which turns float noise of near-zero
# gradients (summation order differs between 1 and 2 processes) into visible steps.
SCENARIOS: dict[str, dict[str, Any]] = {
    # Two mini-batches per epoch, two epochs, whitened rewards, full-vocabulary KL, score scaling.
    "minibatches": dict(
        config=dict(mini_batch_size=4, ppo_epochs=2, whiten_rewards=True, kl_penalty="full",
                    use_score_scaling=True, use_score_norm=True, max_grad_norm=0.5),
        optimizer="sgd",
    ),
    # Gradient accumulation over two mini-batches of 2, early stopping that can trip, response masks
    # (the first token of longer responses excluded from the loss).
    "accumulation": dict(
        config=dict(mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=3, early_stopping=True, target_kl=0.02),
        optimizer="sgd",
        response_masks=True,
    ),
    # The default optimiser (Adam) on one mini-batch: equal to float tolerance, not bit for bit.
    "adam": dict(config=dict(mini_batch_size=8, ppo_epochs=2, learning_rate=3e-4), optimizer="adam"),
    # LoRA: the reference is the policy with its adapter disabled.
    "lora": dict(config=dict(mini_batch_size=4, ppo_epochs=1), optimizer="sgd", lora=True),
    # precision=bf16 (a user-given SGD stepping float32 masters; DDP all-reduces bfloat16 gradients).
    # The float32 masters are compared. The forward passes round activations to bfloat16 (2^-9), the
    # gradients are all-reduced in bfloat16, and once a master's rounding to bfloat16 flips (a layer-norm
    # weight near 1 then moves by 2^-7, about its whole update) later gradients differ too: 1 and 2
    # processes measured 7e-2 apart (relative to the largest update) after one update, and chaotically
    # more after several at lr 0.5 — so one update per step here. 0.15 holds the rounding with margin
    # and still catches a halved gradient (0.5 apart; "bf16" is in MUTANTS). Stats that are 0 up to
    # rounding in one process (the policy loss and policykl of the first mini-batch, whose ratio is 1)
    # get an absolute slack of 1e-4 instead of 1e-6: on a CPU that emulates bfloat16 (AVX2, no
    # AVX-512 BF16) the two layouts' logprobs differ slightly and those stats measured 6e-6 and 7e-6
    # apart (the weights, compared by the update rule, stay the real check).
    "bf16": dict(config=dict(mini_batch_size=8, ppo_epochs=1, precision="bf16"), optimizer="sgd", rtol=0.15,
                 stat_atol=1e-4),
    # GRPO: two prompts with four responses each (one whole group per process), no critic, no KL in
    # the reward but GRPO's k3 KL loss instead. SGD with momentum, so the optimiser keeps state for
    # exactly the parameters it updated: the value head must not be among them. lr 0.2, not 0.5: GRPO's
    # advantages are O(1) on every token, and at 0.5 with momentum the second step diverges (k3 KL 5e8).
    "grpo": dict(
        config=dict(advantage_estimator="grpo", samples_per_prompt=4, mini_batch_size=4, ppo_epochs=2,
                    kl_in_reward=False, kl_loss_coef=0.2, kl_loss_estimator="k3", learning_rate=0.2),
        optimizer="sgd_momentum",
    ),
    # RLOO with pairs: four prompts, two whole groups per process. Its advantages are raw reward
    # differences (no std division; up to ~6 with these scores), hence lr 0.02: at 0.1 the second
    # step's ratios reach 2.8, at 0.5 the ratio guard zeroes mini-batches.
    "rloo": dict(
        config=dict(advantage_estimator="rloo", samples_per_prompt=2, mini_batch_size=4, ppo_epochs=2, learning_rate=0.02),
        optimizer="sgd_momentum",
    ),
    # REINFORCE++: critic-free, with its advantages whitened over the whole global batch (a per-process
    # whitening would differ from one process's) and the KL penalty in the per-token rewards.
    "reinforce_pp": dict(
        config=dict(advantage_estimator="reinforce_pp", mini_batch_size=4, ppo_epochs=2),
        optimizer="sgd_momentum",
    ),
}
# Critic-free scenarios: the value head must keep its initial weights and hold no optimiser state.
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")
SGD_MOMENTUM = 0.5

# Scenarios the 2-process launch also runs with a deliberately wrong gradient scale (the ×P of
# ``PPOTrainer._train_minibatch`` left out), to show the comparison catches it. Not "minibatches":
# its gradient clipping rescales a halved gradient back to the same norm and hides the error.
MUTANTS = ("accumulation", "lora", "bf16", "grpo")


def tokenizer():
    return make_word_tokenizer()


def group_size(name: str) -> int:
    """Responses per prompt (G) of scenario ``name``."""
    return SCENARIOS[name]["config"].get("samples_per_prompt", 1)


def global_batch(step: int, group: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Ragged queries (1–6 tokens), responses (1–8 tokens) and scores of step ``step``: GLOBAL_BATCH
    responses to GLOBAL_BATCH / ``group`` prompts, each prompt repeated ``group`` times in a row."""
    vocab = len(tokenizer())
    gen = torch.Generator().manual_seed(100 + step)
    lengths = lambda high: int(torch.randint(1, high, (1,), generator=gen))  # noqa: E731
    prompts = [torch.randint(3, vocab, (lengths(7),), generator=gen) for _ in range(GLOBAL_BATCH // group)]
    queries = [prompt for prompt in prompts for _ in range(group)]
    responses = [torch.randint(3, vocab, (lengths(9),), generator=gen) for _ in range(GLOBAL_BATCH)]
    scores = [float(s) for s in 2 * torch.randn(GLOBAL_BATCH, generator=gen)]
    return queries, responses, scores


def make_trainer(name: str, num_processes: int, sharding: str = "none") -> PPOTrainer:
    scenario = SCENARIOS[name]
    knobs = dict(scenario["config"], sharding=sharding)
    knobs["mini_batch_size"] //= num_processes
    config = PPOConfig(batch_size=GLOBAL_BATCH // num_processes, learning_rate=knobs.pop("learning_rate", 0.5), seed=3, **knobs)
    language_model = make_tiny_gpt2(tokenizer(), seed=7)
    if scenario.get("lora"):
        import peft

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            # init_lora_weights=False: a nonzero adapter, so the policy differs from its reference.
            lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
            language_model = peft.get_peft_model(language_model, lora)
    torch.manual_seed(5)  # the value head's init
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(language_model)
    # Every trainable parameter, the value head's too, as a user would pass them: leaving the value head
    # alone under a critic-free estimator is the trainer's job.
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizers = {
        "sgd": lambda: torch.optim.SGD(trainable, lr=config.learning_rate),
        "sgd_momentum": lambda: torch.optim.SGD(trainable, lr=config.learning_rate, momentum=SGD_MOMENTUM),
        "adam": lambda: None,  # the trainer's default
    }
    return PPOTrainer(config, policy, tokenizer=tokenizer(), optimizer=optimizers[scenario["optimizer"]]())


def split_group_refusal(num_processes: int) -> str | None:
    """The error of building the ``grpo`` scenario's trainer for a global batch of three groups of four:
    on two processes each would get six responses, one and a half groups. None if it was accepted."""
    group = group_size("grpo")
    knobs = {**SCENARIOS["grpo"]["config"], "mini_batch_size": 1}
    try:
        config = PPOConfig(batch_size=3 * group // num_processes, **knobs)
        PPOTrainer(config, AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer(), seed=7)))
    except ValueError as error:
        return str(error)
    return None


def run_steps(
    name: str, process_index: int, num_processes: int, backward_scale: float = 1.0, gradient_noise: float = 0.0,
    sharding: str = "none",
) -> dict[str, Any]:
    """STEPS steps of scenario ``name`` on this process's share: weights, scalar stats and the
    branches taken (optimiser steps, early-stopping decisions) after each.

    ``backward_scale`` multiplies every loss before backward: 1/P reproduces a trainer that forgot
    its ×P (the mutant the 2-process test must catch). ``gradient_noise`` multiplies every gradient
    entry by (1 + gradient_noise·N(0, 1)): rounding-like noise to check a tolerance absorbs it.
    ``sharding="fsdp2"``: the trainer shards with FSDP2 (weights are then gathered whole for the result).
    """
    trainer = make_trainer(name, num_processes, sharding)
    if gradient_noise:
        noise = torch.Generator().manual_seed(13)
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.register_hook(lambda g: g * (1 + gradient_noise * torch.randn(g.shape, generator=noise)))
    branches = _record_branches(trainer)
    if backward_scale != 1.0:
        backward = trainer.accelerator.backward
        trainer.accelerator.backward = lambda loss, **kwargs: backward(loss * backward_scale, **kwargs)
    share = GLOBAL_BATCH // num_processes
    rows = slice(process_index * share, (process_index + 1) * share)
    group = group_size(name)
    initial = _weights(trainer)
    weights, stats, steps = [], [], []
    for step in range(STEPS):
        branches.update(updates=0, decisions=[])
        queries, responses, scores = global_batch(step, group)
        held = whole_groups(queries[rows], rows.start, group)
        masks = None
        if SCENARIOS[name].get("response_masks"):
            masks = [(torch.arange(len(r)) > 0).long() if len(r) > 1 else torch.ones(1, dtype=torch.long) for r in responses[rows]]
        step_stats = trainer.step(queries[rows], responses[rows], scores[rows], response_masks=masks)
        weights.append(_weights(trainer))
        stats.append({k: float(v) for k, v in step_stats.items() if isinstance(v, float) and not k.startswith("time/")})
        steps.append({"updates": branches["updates"], "decisions": list(branches["decisions"])})
    return {
        "weights": weights, "stats": stats, "branches": steps, "initial": initial,
        "groups": held, "optimizer_state": _parameters_with_optimizer_state(trainer),
    }


def whole_groups(queries: list[torch.Tensor], first_row: int, group: int) -> list[int]:
    """The global indices of the prompt groups a process received as rows ``first_row …`` of the
    global batch; AssertionError unless they are whole groups, each one prompt's ``group`` responses."""
    assert first_row % group == 0 and len(queries) % group == 0, (
        f"rows {first_row}..{first_row + len(queries) - 1} cut a group of {group}: a prompt's responses straddle two processes"
    )
    for start in range(0, len(queries), group):
        members = queries[start:start + group]
        assert all(torch.equal(q, members[0]) for q in members), (
            f"rows {first_row + start}..{first_row + start + group - 1} are not one prompt's {group} responses"
        )
    return list(range(first_row // group, (first_row + len(queries)) // group))


def _parameters_with_optimizer_state(trainer: PPOTrainer) -> list[str]:
    """Names of the parameters the (inner) optimiser holds state for, e.g. momentum buffers: those it updated."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    # precision=bf16: the state belongs to the float32 masters, named after their bfloat16 weights.
    masters = {id(m): w for w, m in getattr(inner, "pairs", [])}
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(masters.get(id(p), p))] for p in inner.state)


def _weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    """The model's state dict, with each bfloat16 weight replaced by its float32 master (precision=bf16):
    updates smaller than a bfloat16 step (layer norms near 1 move by less than 2^-7) show only there."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.sharded:  # FSDP2: the sharded float32 parameters are the masters; gathered on every rank
        from rlhf_cli.ppo.sharding import full_model_state

        full, own = full_model_state(model), model.state_dict(keep_vars=True)
        for key in own.keys() - full.keys():  # a tied weight, gathered once under its partner's name
            full[key] = next(full[k] for k in full if own[k] is own[key])
        return full
    masters = {id(w): m for w, m in getattr(trainer.optimizer.optimizer, "pairs", [])}
    # keep_vars: the Parameter objects themselves, so tied weights (GPT-2's lm_head) find their master too.
    return {k: masters.get(id(v), v).detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _record_branches(trainer: PPOTrainer) -> dict[str, Any]:
    """Count the optimiser steps really taken and record each early-stopping decision with its
    global statistic and threshold, so a test can compare branches before it compares numbers."""
    record: dict[str, Any] = {"updates": 0, "decisions": []}
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper skips accumulation steps
    inner.register_step_post_hook(lambda *_: record.__setitem__("updates", record["updates"] + 1))
    decide = trainer._should_stop_early

    def recording(policykl: torch.Tensor) -> bool:
        stop = decide(policykl)
        statistic = float(trainer._sum_across_processes(policykl.detach().clone()))
        record["decisions"].append((statistic, 1.5 * trainer.config.target_kl, stop))
        return stop

    trainer._should_stop_early = recording
    return record


def checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's bytes in key order: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        # Raw bytes through uint8: numpy has no bfloat16 (the bf16 scenario's weights).
        digest.update(state_dict[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
