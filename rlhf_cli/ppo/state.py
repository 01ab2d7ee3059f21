"""A PPO engine's training state besides the model weights: how it starts, what a checkpoint saves of
it, and how it is restored.

Optimizer and scheduler state, the KL coefficient, the running score moments, the mini-batch
shuffling generator and the step counter: everything an exact continuation needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlhf_cli.algo.kl_control import make_kl_controller
from rlhf_cli.algo.running_moments import RunningMoments
from rlhf_cli.ppo.sharding import full_optimizer_state, load_full_optimizer_state

if TYPE_CHECKING:
    from rlhf_cli.ppo.engine import PPOEngine


def _state_or_none(part: Any) -> Any:
    return part.state_dict() if part is not None else None


def init_engine_state(engine: PPOEngine) -> None:
    """A new engine's KL controller, score moments, mini-batch shuffling and step counter (what
    :func:`engine_state` saves besides the optimiser and scheduler), from its settings."""
    s = engine.settings
    engine.kl_ctl = make_kl_controller(s.adap_kl_ctrl, s.init_kl_coef, s.target, s.horizon)
    engine.running = RunningMoments() if s.use_score_scaling else None
    # Mini-batch order comes from the trainer's own seeded generator, not the global RNG, so
    # generation sampling and shuffling do not perturb each other.
    engine.shuffle_generator = torch.Generator().manual_seed(s.seed)
    engine.current_step = 0


def engine_state(engine: "PPOEngine") -> dict[str, Any]:
    """The engine's training state as a dict of plain values and tensors."""
    return {
        "current_step": engine.current_step,
        "kl_ctl": engine.kl_ctl.state_dict(),
        "running": _state_or_none(engine.running),
        "shuffle_generator": engine.shuffle_generator.get_state(),
        # FSDP2: gathered whole and keyed by name (a collective: every process calls state_dict()).
        "optimizer": full_optimizer_state(engine.model, engine.optimizer.optimizer) if engine.sharded else engine.optimizer.state_dict(),
        "lr_scheduler": _state_or_none(engine.lr_scheduler),
    }


def restore_engine_state(engine: "PPOEngine", state: dict[str, Any]) -> None:
    """Restore what :func:`engine_state` returned; ValueError if it was saved with other score settings."""
    engine.current_step = int(state["current_step"])
    engine.kl_ctl.load_state_dict(state["kl_ctl"])
    if (state["running"] is None) != (engine.running is None):
        raise ValueError("The saved trainer state and these settings disagree on use_score_scaling.")
    if engine.running is not None:
        engine.running.load_state_dict(state["running"])
    engine.shuffle_generator.set_state(state["shuffle_generator"])
    if engine.sharded:
        load_full_optimizer_state(engine.model, engine.optimizer.optimizer, state["optimizer"])
    else:
        engine.optimizer.load_state_dict(state["optimizer"])
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
