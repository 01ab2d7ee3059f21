"""Checkpoints for exact resume (docs/architecture.md, "The run directory").

A checkpoint ``<run dir>/checkpoints/step-N/`` holds everything an exact continuation needs:

* ``weights.safetensors`` — policy + value head (the whole value-head module, LoRA adapters included);
* ``trainer.pt`` — optimizer/scheduler state (with ``ppo.precision=bf16``: the float32 master weights
  and Adam moments; ``weights.safetensors`` then holds the bfloat16 weights, the masters rounded), KL coefficient, running score moments, the mini-batch
  shuffling generator (tensors and plain numbers only: loaded with ``weights_only=True``);
* ``rng-rank{R}.json`` — each process's python, numpy, torch (and CUDA) RNG states and its response
  length generator;
* ``state.json`` — step, data position, number of processes, reward history;
* ``config.yaml`` — the config it was made with; ``tokenizer/`` — for export.

It is written into ``.tmp-step-N`` and renamed when complete, so a crash never leaves a directory
that :func:`list_checkpoints` would take for a checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_cli.errors import RlhfError

CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("state.json", "config.yaml", "weights.safetensors", "trainer.pt")
FORMAT_VERSION = 1


class CheckpointError(RlhfError):
    """A checkpoint that does not exist, is incomplete or corrupt, or does not fit this run."""


@dataclass
class LoopState:
    """The training loop's own position, saved next to the trainer's state."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    reward_means: list[float] = field(default_factory=list)


# Finding checkpoints -------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> Optional[int]:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def resolve_resume(resume: Optional[str], run_dir: Path, *, what: str = "checkpoint.resume") -> Optional[Path]:
    """The checkpoint to resume from: None, the newest of ``run_dir`` for "auto", or a given path
    (a run directory stands for its newest checkpoint). ``what`` names the input in errors."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser().resolve()
    if not path.exists():
        hint = (
            "or checkpoint.resume=auto with output_dir set to the run directory to continue its newest checkpoint"
            if what == "checkpoint.resume" else "or a run directory that has checkpoints"
        )
        raise CheckpointError(f"{what} {resume} does not exist. Give a checkpoint directory (…/checkpoints/step-N), {hint}.")
    if path.is_dir() and checkpoint_step(path) is None and list_checkpoints(path):
        return list_checkpoints(path)[-1]  # a run directory: take its newest checkpoint
    return path


@dataclass
class ResumePoint:
    """A checkpoint chosen for resuming, read and checked before any model loads."""

    path: Path
    state: dict[str, Any]  # state.json
    config: DictConfig  # the config it was made with
    trainer_state: dict[str, Any]  # trainer.pt
    rng: dict[str, Any]  # this process's RNG states

    @property
    def step(self) -> int:
        return int(self.state["step"])


def open_checkpoint(path: Path, process_index: int) -> ResumePoint:
    """Read every file of the checkpoint at ``path`` this process needs (CheckpointError if any is
    missing or unreadable). trainer.pt is loaded here, once, and handed to the trainer later."""
    state, config = read_checkpoint(path)
    return ResumePoint(path, state, config, load_trainer_state(path), load_rng_file(path, process_index))


def find_resume_point(resume: Optional[str], run_dir: Path, process_index: int) -> tuple[Optional[ResumePoint], list[str]]:
    """The checkpoint ``checkpoint.resume`` asks for, and one-line notices for the console.

    ``auto``: the newest checkpoint of ``run_dir`` that is complete and readable; a damaged newer one is
    skipped with a notice (a crash or a full disk while writing, a bad copy); none at all: None and a
    notice that the run starts fresh. A PATH: that checkpoint, and a damaged one is refused.
    """
    if resume != "auto":
        path = resolve_resume(resume, run_dir)
        return (open_checkpoint(path, process_index) if path is not None else None), []
    found = list_checkpoints(run_dir)
    if not found:
        return None, [f"checkpoint.resume=auto: no checkpoint in {run_dir}; starting a fresh run."]
    damaged: list[CheckpointError] = []
    for path in reversed(found):
        try:
            point = open_checkpoint(path, process_index)
        except CheckpointError as err:
            damaged.append(err)
            continue
        notices = [f"checkpoint.resume=auto: skipped a damaged checkpoint: {err}" for err in damaged]
        return point, notices
    raise CheckpointError(
        f"checkpoint.resume=auto found no usable checkpoint in {run_dir}: every one of "
        f"{', '.join(p.name for p in found)} is damaged (the newest: {damaged[0]}). Resume from an intact copy "
        f"with checkpoint.resume=PATH, or start a new run with overwrite=true or in another output_dir."
    )


def read_checkpoint(path: Path) -> tuple[dict[str, Any], DictConfig]:
    """``state.json`` and the config of a checkpoint, after checking it is complete."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected …/checkpoints/step-N/).")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} is not a complete checkpoint: {', '.join(missing)} missing. It may be a partial copy or "
            f"not a checkpoint at all; pick another step-N directory (or checkpoint.resume=auto)."
        )
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        config = OmegaConf.load(path / "config.yaml")
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt: its state.json or config.yaml cannot be read ({err}).") from err
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} was written in checkpoint format {state.get('format')!r}; this version reads {FORMAT_VERSION}.")
    _check_weights_readable(path)
    ranks = [path / f"rng-rank{r}.json" for r in range(int(state["num_processes"]))]
    if not all(p.is_file() for p in ranks):
        raise CheckpointError(f"{path} is incomplete: it lacks the RNG state of some of its {state['num_processes']} processes.")
    return state, config


def _check_weights_readable(path: Path) -> None:
    """Parse the safetensors header: a truncated or overwritten file fails here, before any run starts."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "weights.safetensors"), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}/weights.safetensors is corrupt ({err}); pick another checkpoint.") from err


# Comparing configs -----------------------------------------------------------------------------------
# Changing these makes the saved state meaningless (other weights, other data order or shapes).
_BREAKING = ("model.", "dataset.", "seed", "ppo.batch_size", "ppo.mini_batch_size",
             "ppo.gradient_accumulation_steps", "ppo.use_score_scaling", "ppo.use_score_norm",
             "ppo.precision",  # bf16's optimiser state holds float32 masters; fp32's does not
             "ppo.advantage_estimator",  # gae's optimiser state holds the value head; the critic-free ones' does not
             "generation.samples_per_prompt",
             "ppo.sharding")  # an FSDP2 checkpoint's optimiser state is keyed by name, DDP's by position  # the data position counts prompt batches of batch_size / G
# Changing these does not touch what is computed.
_HARMLESS = ("steps", "epochs", "logging.", "checkpoint.", "output_dir", "eval_prompts", "threads", "overwrite")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
        return out
    return {prefix.rstrip("."): node}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


@dataclass
class ConfigChanges:
    breaking: list[str]
    harmless: list[str]
    other: list[str]


def compare_configs(
    saved: DictConfig, current: DictConfig, *, breaking: tuple[str, ...] = _BREAKING, harmless: tuple[str, ...] = _HARMLESS
) -> ConfigChanges:
    """Keys whose values differ between the checkpoint's config and this run's, by consequence
    (``breaking``/``harmless``: key patterns, a trailing dot for a whole section; rlhf reward passes its own)."""
    old = _flatten(OmegaConf.to_container(saved, resolve=True))
    new = _flatten(OmegaConf.to_container(current, resolve=True))
    changes = ConfigChanges([], [], [])
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key)!r} → {new.get(key)!r}"
        if key not in old:  # a key this version added: the checkpoint predates it, nothing to compare
            changes.other.append(f"{key}: (not in the checkpoint's config) → {new.get(key)!r}")
        elif _matches(key, harmless):
            changes.harmless.append(line)
        elif _matches(key, breaking):
            changes.breaking.append(line)
        else:
            changes.other.append(line)
    return changes


def check_resumable(
    point: ResumePoint, cfg: DictConfig, processes: int, notify: Callable[[str], None], *,
    breaking: tuple[str, ...] = _BREAKING, harmless: tuple[str, ...] = _HARMLESS,
) -> None:
    """CheckpointError unless ``point`` fits this run (same number of processes, no breaking config
    change); otherwise ``notify`` the resume and each change, by consequence."""
    if int(point.state["num_processes"]) != processes:
        raise CheckpointError(
            f"{point.path} was written by {point.state['num_processes']} process(es); resume it with the same number "
            f"(this launch has {processes})."
        )
    changes = compare_configs(point.config, cfg, breaking=breaking, harmless=harmless)
    if changes.breaking:
        raise CheckpointError(
            f"Cannot resume from {point.path}: the config changes what the checkpoint was made for — "
            + "; ".join(changes.breaking)
            + ". Resume with the checkpoint's values (its config.yaml), or start a fresh run in another output_dir."
        )
    notify(f"Resuming from [bold]{point.path}[/] (after step {point.state['step']}).")
    for line in changes.harmless:
        notify(f"  changed (harmless): {line}")
    for line in changes.other:
        notify(f"  changed (training differs from here on): {line}")


# RNG state -------------------------------------------------------------------------------------------
def capture_rng(length_rng: np.random.Generator) -> dict[str, Any]:
    """This process's RNG states as JSON-safe values."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
        "length_rng": length_rng.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any], length_rng: np.random.Generator) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    length_rng.bit_generator.state = state["length_rng"]


# Writing ---------------------------------------------------------------------------------------------
def write_rng_file(tmp_dir: Path, process_index: int, length_rng: np.random.Generator) -> None:
    (tmp_dir / f"rng-rank{process_index}.json").write_text(json.dumps(capture_rng(length_rng)), encoding="utf-8")


def write_main_files(
    tmp_dir: Path,
    *,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    tokenizer: Any,
    cfg: DictConfig,
    loop: LoopState,
    num_processes: int,
    weights: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Everything but the per-rank RNG files (main process only). ``weights``: the full state dict
    gathered from a sharded model (FSDP2), saved instead of ``model``'s own tensors."""
    from safetensors.torch import save_file, save_model

    if weights is not None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_dir / "weights.safetensors"), metadata={"format": "pt"})
    else:
        save_model(model, str(tmp_dir / "weights.safetensors"))
    torch.save(trainer_state, tmp_dir / "trainer.pt")
    tokenizer.save_pretrained(tmp_dir / "tokenizer")
    (tmp_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    state = {
        "format": FORMAT_VERSION,
        "step": loop.step,
        "epoch": loop.epoch,
        "batch_in_epoch": loop.batch_in_epoch,
        "reward_means": loop.reward_means,
        "num_processes": num_processes,
    }
    (tmp_dir / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def temporary_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-step-{step}"


def publish(tmp_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished temporary directory to ``step-N`` and delete all but the newest ``keep``."""
    final = tmp_dir.parent / f"step-{step}"
    if final.exists():  # the same step written again after a resume from an older checkpoint
        shutil.rmtree(final)
    tmp_dir.rename(final)
    for old in list_checkpoints(tmp_dir.parent.parent)[:-keep]:
        shutil.rmtree(old)
    return final


# Reading ---------------------------------------------------------------------------------------------
def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load ``weights.safetensors`` into ``model`` (the unwrapped value-head model), exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path / "weights.safetensors"), strict=False)
    except SafetensorError as err:
        raise CheckpointError(f"{path}/weights.safetensors is corrupt ({err}); pick another checkpoint.") from err
    except RuntimeError as err:  # shape mismatch: another architecture or size
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{path} was made for a different model: its weights do not fit this one ({first}). Resume with the "
            f"model config the checkpoint was made with (see its config.yaml)."
        ) from err
    if missing or unexpected:
        names = ", ".join(list(missing)[:3] + list(unexpected)[:3])
        raise CheckpointError(
            f"{path} was made for a different model: {len(missing)} weights missing and {len(unexpected)} unexpected "
            f"(e.g. {names}). Resume with the model config the checkpoint was made with (see its config.yaml)."
        )


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for a damaged file; all mean the same here
        raise CheckpointError(f"{path}/trainer.pt cannot be read ({type(err).__name__}: {err}); pick another checkpoint.") from err


def load_rng_file(path: Path, process_index: int) -> dict[str, Any]:
    try:
        return json.loads((path / f"rng-rank{process_index}.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path}/rng-rank{process_index}.json is corrupt ({err}).") from err
