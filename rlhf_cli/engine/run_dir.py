"""The run directory: config.yaml, metrics.jsonl, trackers/, final/ (DESIGN §8).

Under ``accelerate launch`` every rank composes its own config; rank 0's resolved copy is
broadcast so all ranks agree on one directory (a ``${now:...}`` in a path could otherwise
differ by a second between ranks), and only rank 0 writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from rlhf_cli.logging import MetricsFile


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

    def create(self, cfg: DictConfig, *, resumed_step: int | None = None) -> None:
        """Write config.yaml; start metrics.jsonl afresh, or on resume keep the lines up to
        ``resumed_step`` (steps after it were lost with the interruption and are run again)."""
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        if resumed_step is None or not self.metrics_path.exists():
            self.metrics_path.write_text("", encoding="utf-8")
            return
        kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= resumed_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def metrics(self) -> MetricsFile:
        return MetricsFile(self.metrics_path)
