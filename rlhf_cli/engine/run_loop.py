"""The loop of a run, the same for ``rlhf train`` and ``rlhf reward``: step, agree on a stop signal,
checkpoint when due (or when stopping), finish; the run-directory lock is released however it ends.

A run object gives the loop its parts (:class:`rlhf_cli.engine.train.TrainingRun`,
:class:`rlhf_cli.engine.reward_train.RewardTrainingRun`): ``state``, ``cfg``, ``loop`` (its ``step``),
``steps``, ``reporter``, ``run_dir``, ``lock``, ``log_error``, and ``train_step()``,
``save_checkpoint()`` and ``finish()``; :class:`LoopControl` adds the two decisions they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rlhf_cli.engine.signals import Preempted, StopRequest
from rlhf_cli.engine.together import agree


class LoopControl:
    """When to checkpoint and whether to stop, for a run with ``cfg``, ``loop``, ``state`` and ``log_error``."""

    def checkpoint_due(self) -> bool:
        every = int(self.cfg.checkpoint.every)
        return every > 0 and self.loop.step % every == 0

    def stop_requested(self, request: StopRequest) -> bool:
        """Whether any process received a stop signal; raises on every process if the main one could
        not write this step's metrics line (one tiny all-reduce when distributed, for both)."""
        failed, self.log_error = self.log_error, None
        return agree(self.state, failed, request.received is not None)


def drive(run: Any) -> Any:
    """Run ``run`` to its last step and return ``run.finish()``. SIGTERM/SIGINT finish the current
    step, write a checkpoint and raise :class:`Preempted` (exit 75)."""
    try:
        with run.reporter, StopRequest(announce=run.state.is_main_process) as stop:
            while run.loop.step < run.steps:
                run.train_step()
                stopping = run.stop_requested(stop)  # before the checkpoint: none after a lost metrics line
                saved = run.save_checkpoint() if run.checkpoint_due() or stopping else None
                if stopping:
                    raise preempted(run, stop, saved)
        return run.finish()
    finally:
        run.lock.release()


def preempted(run: Any, stop: StopRequest, saved: Optional[Path]) -> Preempted:
    error = Preempted(
        f"{stop.name or 'a stop signal'} received; the run stopped after step {run.loop.step} of {run.steps} and wrote "
        f"the checkpoint {saved}. Continue it with the same command plus `checkpoint.resume=auto output_dir={run.run_dir.root}`."
    )
    error.quiet = not run.state.is_main_process  # every process stops; the main one says so
    return error
