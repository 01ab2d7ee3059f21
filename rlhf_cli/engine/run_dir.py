"""The run directory: config.yaml, metrics.jsonl, trackers/, final/ (docs/architecture.md, "The run directory").

Nothing is written into it before the run has really started (every part built, the checkpoint
loaded, the reward checked on the first batch): :meth:`RunDirectory.check_start` and
:meth:`RunDirectory.resumed_metrics` only read, so a start that fails leaves an earlier run as it was.

Under ``accelerate launch`` every rank composes its own config; rank 0's resolved copy is
broadcast so all ranks agree on one directory (a ``${now:...}`` in a path could otherwise
differ by a second between ranks), and only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from rlhf_cli.errors import RlhfError
from rlhf_cli.reporting import MetricsFile

# A directory holding any of these holds a run: a new run there must be asked for (overwrite=true).
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
# Everything a run writes at the top of its directory: what overwrite=true deletes (nothing else is touched).
RUN_ENTRIES = (*RUN_MARKERS, "final", "trackers", "report.md", "curves.png", ".hydra", "train.log", "reward.log")


class RunDirectoryError(RlhfError):
    """The output directory cannot take this run (it holds another one, or its metrics are damaged)."""


def shared_resolved_config(cfg: DictConfig, state: PartialState) -> DictConfig:
    """Resolve ``cfg`` on rank 0 and hand the same resolved config to every rank."""
    text = OmegaConf.to_yaml(cfg, resolve=True) if state.is_main_process else None
    if state.num_processes > 1:
        holder = [text]
        broadcast_object_list(holder, from_process=0)
        text = holder[0]
    resolved = OmegaConf.create(text)
    resolved.output_dir = str(Path(resolved.output_dir).expanduser().resolve())
    OmegaConf.set_readonly(resolved, True)
    return resolved


@dataclass
class RunDirectory:
    """Paths of one run and the main process's writes into them."""

    root: Path
    is_main: bool

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def trackers_dir(self) -> Path:
        return self.root / "trackers"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def curves_path(self) -> Path:
        return self.root / "curves.png"

    def held_run(self) -> list[str]:
        """The files of an earlier run found here (empty if the directory is new or holds none)."""
        return [name for name in RUN_MARKERS if (self.root / name).exists()]

    def check_start(self, *, resume_from: Optional[Path], resume: Optional[str], overwrite: bool) -> bool:
        """Whether this start may use the directory; True if it continues the run held here.

        A new run (nothing to resume, or a checkpoint of another directory) refuses a directory holding
        a run unless ``overwrite``; ``overwrite`` refuses to delete the checkpoint it would resume from.
        """
        continuing = resume_from is not None and resume_from.is_relative_to(self.root)
        if continuing and overwrite:
            raise RunDirectoryError(
                f"overwrite=true would delete {self.root}, which holds the checkpoint this run resumes from "
                f"({resume_from}). Drop overwrite=true to continue that run, or drop checkpoint.resume to replace it."
            )
        found = self.held_run()
        if continuing or overwrite or not found:
            return continuing
        held = f"{self.root} already holds a run ({', '.join(found)})"
        if resume == "auto":
            raise RunDirectoryError(
                f"checkpoint.resume=auto found no checkpoint to continue, and {held} that it would replace. "
                f"Replace it with overwrite=true, or choose another output_dir."
            )
        raise RunDirectoryError(
            f"{held}. Continue it with checkpoint.resume=auto, replace it with overwrite=true (its files are "
            f"deleted once the new run has started), or choose another output_dir."
        )

    def resumed_metrics(self, resumed_step: int) -> tuple[list[str], Optional[str]]:
        """The lines of metrics.jsonl a resume from ``resumed_step`` keeps, and a notice if a torn last
        line was dropped.

        Steps after the checkpoint were lost with the interruption and are run again. A last line that is
        not JSON was cut by a kill in the middle of a write, after the checkpoint by construction: it is
        dropped. A damaged line before the last is a RunDirectoryError (nothing is written).
        """
        if not self.metrics_path.exists():
            return [], None
        lines = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept, notice = [], None
        for number, line in enumerate(lines, start=1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError) as err:
                if number == len(lines):
                    notice = f"{self.metrics_path}: dropped its torn last line (line {number}, cut by the interruption)."
                    break
                raise RunDirectoryError(
                    f"{self.metrics_path} is damaged at line {number} of {len(lines)} ({type(err).__name__}: {err}); "
                    f"only the last line can be torn by an interruption. Repair or delete that line, then resume again."
                ) from err
            if step <= resumed_step:
                kept.append(line)
        return kept, notice

    def create(self, cfg: DictConfig, *, resumed_metrics: Optional[list[str]] = None, replace: bool = False) -> None:
        """Write config.yaml and metrics.jsonl: afresh, or on resume with ``resumed_metrics`` (see
        :meth:`resumed_metrics`). ``replace``: first delete the earlier run held here (overwrite=true)."""
        if not self.is_main:
            return
        if replace:
            for name in RUN_ENTRIES:
                path = self.root / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        self.metrics_path.write_text("".join(line + "\n" for line in resumed_metrics or []), encoding="utf-8")

    def metrics(self) -> MetricsFile:
        return MetricsFile(self.metrics_path)
