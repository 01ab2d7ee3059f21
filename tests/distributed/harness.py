"""What each process of the 2-process test launch runs (``python -m tests.distributed.harness OUT``).

1. A whole ``rlhf train +recipe=smoke`` run through the engine's :class:`TrainingRun`, then a
   checksum of this rank's policy weights.
2. The fixed-rollout scenarios of :mod:`tests.distributed.scenarios` on this rank's half of each
   batch: weights, stats and branches after every step (grouped scenarios assert here that this
   rank's rows are whole groups); then the mutants (a missing ×P in the gradient scale) the test
   must tell apart from the real thing.
3. The error of a trainer whose per-process share of the global batch would split a group.

Everything goes to ``OUT/rank{r}.pt`` for the test to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.engine.components import launch_state
    from rlhf_cli.engine.train import TrainingRun
    from tests.distributed.scenarios import MUTANTS, SCENARIOS, checksum, run_steps, split_group_refusal

    # The process state must exist before anything else touches Accelerate, as at the engine's entry.
    state = launch_state()
    cfg = compose_train_config(["+recipe=smoke", f"output_dir={out_dir / 'run'}", "eval_prompts=0", "logging.progress=false"])
    run = TrainingRun(cfg)
    for _ in range(run.steps):
        run.train_step()
    policy = run.trainer.accelerator.unwrap_model(run.trainer.model)
    train = {
        "num_processes": run.state.num_processes,
        "process_index": run.state.process_index,
        "checksum": checksum(policy.state_dict()),
    }
    run.finish()

    scenarios = {name: run_steps(name, state.process_index, state.num_processes) for name in SCENARIOS}
    missing_scale = 1.0 / state.num_processes  # what the trainer would compute without its ×P
    mutants = {name: run_steps(name, state.process_index, state.num_processes, missing_scale) for name in MUTANTS}
    refusal = split_group_refusal(state.num_processes)
    result = {"train": train, "scenarios": scenarios, "mutants": mutants, "split_group_refusal": refusal}
    torch.save(result, out_dir / f"rank{state.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
