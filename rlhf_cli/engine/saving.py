"""Writing a run's checkpoints, ``final/`` and report, safe against a full disk and diverged weights;
and reading a checkpoint back into a run (:func:`restore_checkpoint`).

Each write is checked first (the weights must be finite: :mod:`rlhf_cli.engine.divergence`), then
done inside :func:`rlhf_cli.engine.disk.guarded_write` (a failed write removes what it started and is
one paragraph), and the processes agree on the outcome (:func:`rlhf_cli.engine.together.agreed`), so a
rank-0 write that fails stops every rank instead of leaving them at the next barrier.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from accelerate import PartialState

from rlhf_cli.engine import checkpoint as ckpt
from rlhf_cli.engine import sharded_state
from rlhf_cli.engine.batches import StreamPosition
from rlhf_cli.engine.disk import guarded_write, remove_tree, tree_bytes, truncate_to
from rlhf_cli.engine.export import save_final
from rlhf_cli.engine.together import agreed
from rlhf_cli.ppo.sharding import full_model_state, load_full_model_state
from rlhf_cli.reporting import metrics_line

if TYPE_CHECKING:
    from rlhf_cli.engine.reward_train import RewardTrainingRun
    from rlhf_cli.engine.train import TrainingRun

    AnyRun = Union[TrainingRun, RewardTrainingRun]


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_bytes(run: "AnyRun", model) -> int:
    """Roughly what a checkpoint takes: the newest complete one's size, else the weights plus Adam's two
    float32 moments (and the float32 masters with ppo.precision=bf16)."""
    existing = ckpt.list_checkpoints(run.run_dir.root)
    if existing:
        return tree_bytes(existing[-1])
    return parameter_bytes(model) + 3 * 4 * sum(p.numel() for p in model.parameters())


def resume_advice(run: "AnyRun") -> str:
    existing = ckpt.list_checkpoints(run.run_dir.root)
    kept = f"The earlier checkpoints are intact (newest: {existing[-1]})" if existing else "No earlier checkpoint exists"
    return (
        f"{kept}. Free some space (a lower checkpoint.keep also helps), then continue with the same command plus "
        f"`checkpoint.resume=auto output_dir={run.run_dir.root}`."
    )


def save_checkpoint(run: "TrainingRun") -> Path:
    """Write ``checkpoints/step-N`` (all ranks take part: each saves its own RNG state; with FSDP2 every
    rank also takes part in gathering the full weights and optimiser state)."""
    state, step, trainer = run.state, run.loop.step, run.trainer
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Sharded, each rank checks its own shard: agreed, so one rank's non-finite shard stops them all.
    agreed(state, lambda: run.watch.check_weights(model, step, f"checkpoints/step-{step}"))
    gathered: dict = {}

    def collect() -> None:  # sharded: gathering the full weights and optimiser state is a collective of every process
        gathered.update(trainer_state=trainer.state_dict(), weights=full_model_state(trainer.model) if trainer.sharded else None)

    return write_checkpoint(
        state, run.run_dir.root, step, keep=int(run.cfg.checkpoint.keep), needed=checkpoint_bytes(run, model),
        advice=resume_advice(run), rank_files=lambda tmp: ckpt.write_rng_file(tmp, state.process_index, run.length_rng),
        collect=collect, main_files=lambda tmp: ckpt.write_main_files(
            tmp, model=model, tokenizer=run.tokenizer, cfg=run.cfg, loop=run.loop, num_processes=state.num_processes, **gathered),
    )


def write_checkpoint(
    state: PartialState,
    root: Path,
    step: int,
    *,
    keep: int,
    needed: int,
    advice: str,
    rank_files: Callable[[Path], None],
    main_files: Callable[[Path], None],
    collect: Optional[Callable[[], None]] = None,
) -> Path:
    """``checkpoints/step-N`` of any run, in agreed phases (each agreement is also the barrier between
    them): the main process makes ``.tmp-step-N``; every process writes its own files into it
    (``rank_files(tmp)``); every process takes part in ``collect()`` (a collective, e.g. gathering
    sharded weights); the main process writes the rest (``main_files(tmp)``) and publishes it as
    ``step-N``, keeping the newest ``keep``. A failed write on any process removes ``.tmp-step-N`` and
    stops every process with one paragraph; earlier checkpoints are untouched."""
    tmp = ckpt.temporary_dir(root, step)
    what = f"checkpoint step-{step}"
    guard = dict(needed=needed, undo=remove_tree(tmp), advice=advice)

    def make_dir() -> None:
        if state.is_main_process:
            with guarded_write(tmp, what, **guard):
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a crash while writing this very step
                tmp.mkdir(parents=True)

    def write_rank() -> None:
        with guarded_write(tmp, what, **guard):
            rank_files(tmp)

    def write_main() -> None:
        if state.is_main_process:
            with guarded_write(tmp, what, **guard):
                main_files(tmp)
                ckpt.publish(tmp, step, keep)

    for phase in (make_dir, write_rank, collect, write_main):
        if phase is None:
            continue
        try:
            agreed(state, phase)
        except BaseException:
            if state.is_main_process:
                remove_tree(tmp)()  # a peer's failed write leaves no .tmp-step-N either
            raise
    return tmp.parent / f"step-{step}"


def restore_checkpoint(run: "TrainingRun", point: ckpt.ResumePoint) -> None:
    """Weights, trainer state, RNG, prompt-stream position and loop state of ``point`` into ``run``."""
    trainer, saved = run.trainer, point.state
    if trainer.sharded:  # every process reads the full weights and keeps its shard
        weights = sharded_state.read_weights(point.path)
        sharded_state.check_weights_fit(point.path, weights, trainer.model)
        load_full_model_state(trainer.model, weights)
    else:
        ckpt.load_weights(point.path, trainer.accelerator.unwrap_model(trainer.model))
    trainer.load_state_dict(point.trainer_state)
    point.trainer_state = {}  # now in the optimizer: no second copy of its state for the whole run
    ckpt.restore_rng(point.rng, run.length_rng)
    run.stream.position = StreamPosition(int(saved["epoch"]), int(saved["batch_in_epoch"]))
    run.loop = ckpt.LoopState(step=int(saved["step"]), epoch=int(saved["epoch"]), batch_in_epoch=int(saved["batch_in_epoch"]),
                              reward_means=[float(r) for r in saved["reward_means"]])


def save_final_model(run: "TrainingRun", policy) -> None:
    """``final/`` from finite weights, or nothing (main process)."""
    final_dir = run.run_dir.final_dir
    run.watch.check_weights(policy, run.loop.step, "final/")
    with guarded_write(final_dir, "final/", needed=parameter_bytes(policy), undo=remove_tree(final_dir),
                       advice=resume_advice(run)):
        save_final(policy, run.tokenizer, final_dir)


def write_outputs(path: Path, what: str, write, *, advice: str, needed: int = 64 * 1024) -> None:
    """report.md, curves.png (small files), a reward model's final/: removed again if their write fails."""
    with guarded_write(path, what, needed=needed, undo=remove_tree(path), advice=advice):
        write()


def append_metrics(run: "AnyRun", step: int, stats: dict) -> None:
    """One metrics.jsonl line (main process); a failed append cuts the file back to its last whole line."""
    path = run.run_dir.metrics_path
    line = metrics_line(step, stats)
    size = path.stat().st_size if path.exists() else 0
    with guarded_write(path, "metrics.jsonl", needed=len(line.encode()), undo=truncate_to(path, size),
                       advice=lambda: resume_advice(run)):
        run.metrics.append(line)
