"""When a run has diverged: the engine's stopping rule on top of the trainer's divergence guard.

The trainer skips every mini-batch update whose loss or gradient norm is not finite
(:mod:`rlhf_cli.ppo.guard`, counted in ``ppo/nonfinite_minibatches``). A single such mini-batch is a
spike the run survives. The run stops (exit 2, one paragraph) when it has diverged:

* every mini-batch of a step was skipped (the step learned nothing: the weights no longer give a
  finite loss), or
* steps with skipped mini-batches came :data:`STEPS_IN_A_ROW` times in a row, or
* generation met non-finite logits (the weights give no usable distribution), or
* the weights themselves are not finite where a checkpoint or ``final/`` would be written (so
  neither is ever written from them).

``rlhf reward`` runs the same guard (one optimiser step per step) and stops by the same count of
steps in a row with a skipped update, and by the same weights check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig

from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.errors import RlhfError

# Consecutive steps with at least one non-finite mini-batch after which the run stops.
STEPS_IN_A_ROW = 3
# What transformers' sampling raises on a NaN/inf distribution.
_BAD_PROBABILITIES = "probability tensor contains either"


class DivergenceError(RlhfError):
    """Training diverged: losses, gradients, logits or weights are no longer finite."""


@dataclass
class DivergenceWatch:
    """Counts steps with non-finite mini-batches and stops the run by the rule above."""

    cfg: DictConfig
    run_dir: Path
    is_main: bool = True  # every process finds the same divergence; the main one says so
    in_a_row: int = 0
    reward_model: bool = False  # an ``rlhf reward`` run: its advice names optim.*, not ppo.*

    def after_step(self, step: int, stats: dict[str, Any]) -> None:
        """``rlhf train``: the rule above, from a PPO step's ``ppo/nonfinite_*`` stats."""
        skipped, total = int(stats.get("ppo/nonfinite_minibatches", 0)), int(stats.get("ppo/minibatches", 1))
        quantity = "loss" if stats.get("ppo/nonfinite_loss_minibatches", 0) else "gradient norm"
        if skipped and skipped == total:
            self.stop(step, f"the {quantity} was not finite in every one of its {total} mini-batches")
        self.count(step, bool(skipped), f"the {quantity} was not finite in mini-batches of {STEPS_IN_A_ROW} steps in a row")

    def count(self, step: int, skipped: bool, what: str) -> None:
        """One step with (``skipped``) or without skipped updates; stops with ``what`` at STEPS_IN_A_ROW."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= STEPS_IN_A_ROW:
            self.stop(step, what)

    def stop(self, step: int, what: str) -> None:
        message = reward_divergence_message if self.reward_model else divergence_message
        error = DivergenceError(message(self.cfg, self.run_dir, step, what))
        error.quiet = not self.is_main
        raise error

    @contextlib.contextmanager
    def logits_guard(self, step: int) -> Iterator[None]:
        """Generation refusing NaN/inf probabilities during ``step``'s rollout: the weights diverged."""
        try:
            yield
        except RuntimeError as err:
            if is_nonfinite_sampling(err):
                self.stop(step, "the policy's logits were not finite during generation")
            raise

    def check_weights(self, model: torch.nn.Module, step: int, writing: str) -> None:
        """Stop before ``writing`` (a checkpoint, final/) from weights that are not finite."""
        bad = first_nonfinite_parameter(model)
        if bad is not None:
            self.stop(step, f"the weights are not finite ({bad}); {writing} was not written")


def first_nonfinite_parameter(model: torch.nn.Module) -> Optional[str]:
    """The first parameter holding NaN/inf; of a sharded (FSDP2) model, in this process's shard."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor: no collective
        if not bool(torch.isfinite(local).all()):
            return name
    return None


def is_nonfinite_sampling(err: BaseException) -> bool:
    """Whether ``err`` is generation refusing a NaN/inf next-token distribution."""
    return isinstance(err, RuntimeError) and _BAD_PROBABILITIES in str(err)


def divergence_message(cfg: DictConfig, run_dir: Path, step: int, what: str) -> str:
    """``rlhf train``'s paragraph: what diverged, what to change in ppo.*, where to resume from."""
    ppo = cfg.ppo
    return (
        f"Training diverged at step {step}: {what}. Try a lower ppo.learning_rate (now {ppo.learning_rate}), "
        f"{_clip_advice('ppo', ppo.max_grad_norm)}, or a smaller reward scale (ppo.use_score_scaling=true, "
        f"ppo.score_clip). {_last_good(run_dir)}. final/ was not written."
    )


def reward_divergence_message(cfg: DictConfig, run_dir: Path, step: int, what: str) -> str:
    """``rlhf reward``'s paragraph, naming its optim.* settings."""
    optim = cfg.optim
    return (
        f"Reward-model training diverged at step {step}: {what}. Try a lower optim.learning_rate (now "
        f"{optim.learning_rate}) or {_clip_advice('optim', optim.max_grad_norm)}. {_last_good(run_dir)}. "
        f"final/ was not written."
    )


def _clip_advice(group: str, max_grad_norm: Optional[float]) -> str:
    return f"{group}.max_grad_norm={max_grad_norm} lower" if max_grad_norm is not None else f"{group}.max_grad_norm=1.0"


def _last_good(run_dir: Path) -> str:
    checkpoints = ckpt.list_checkpoints(run_dir)
    if checkpoints:
        return f"The last checkpoint is {checkpoints[-1]}: resume from it with checkpoint.resume=auto and the changes above"
    return "No checkpoint was written (checkpoint.every sets how often), so start again with the changes"
