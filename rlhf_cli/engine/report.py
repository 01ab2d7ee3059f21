"""Before/after comparison on held-out prompts.

"Before" is the reference model (the frozen initial policy), "after" the trained policy. Both
generate under a forked, fixed-seed RNG so the report never perturbs the training stream and two
runs with the same seed print the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf_cli.rewards import RewardFunction, score_responses
from rlhf_cli.rollout.generation import generate_responses


@dataclass
class Comparison:
    """Rows of the before/after table and their means."""

    prompts: list[str]
    before: list[str]
    before_rewards: list[float]
    after: list[str]
    after_rewards: list[float]

    @property
    def mean_before(self) -> float:
        return sum(self.before_rewards) / max(1, len(self.before_rewards))

    @property
    def mean_after(self) -> float:
        return sum(self.after_rewards) / max(1, len(self.after_rewards))


def _respond(model: nn.Module, prompt_ids: list[Tensor], *, seed: int, tokenizer, generation: dict, device) -> list[str]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses = generate_responses(model, prompt_ids, device=device, **generation)
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def compare_before_after(
    *,
    before_model: nn.Module,
    after_model: nn.Module,
    prompt_ids: list[Tensor],
    prompts: list[str],
    tokenizer,
    reward_fn: RewardFunction,
    generation: dict,
    seed: int,
    device,
) -> Comparison:
    """Generate from both models on the same prompts with the same seed and score both."""
    before = _respond(before_model, prompt_ids, seed=seed, tokenizer=tokenizer, generation=generation, device=device)
    after = _respond(after_model, prompt_ids, seed=seed, tokenizer=tokenizer, generation=generation, device=device)
    return Comparison(
        prompts=prompts,
        before=before,
        before_rewards=score_responses(reward_fn, prompts, before).tolist(),
        after=after,
        after_rewards=score_responses(reward_fn, prompts, after).tolist(),
    )
