"""Composing the config once per job, and the overrides the CLI adds.

:func:`compose_train_config` is what tests and library code use. ``rlhf train`` (``rlhf reward``)
opens a :func:`hydra_session`, composes and validates every job of the run or sweep with
:func:`compose_jobs` (so a user mistake prints as one paragraph of ours, before any directory
exists), then has that session's Hydra run them: its run, sweeper and launcher ask the session's
loader (:class:`ComposeOnce`) for the same configs and get the very objects that were checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from hydra import compose, version
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from rlhf_cli.config.messages import explain, parse_error
from rlhf_cli.config.paths import config_dir
from rlhf_cli.config.store import register_configs
from rlhf_cli.config.validate import validate as validate_config
from rlhf_cli.errors import ConfigError

PRIMARY_CONFIG = "train"
OUTPUT_DIR_KEY = "output_dir"


class ComposeOnce(ConfigLoaderImpl):
    """Hydra's config loader, composing each (primary config, overrides, mode) once.

    Hydra's own run composes a job's config twice (``get_mode``, then ``run``) and its sweeper once
    more per job (``validate_batch_is_legal``, then the launcher); the command line composes it first,
    to check it. With this loader every later request gets the object composed first: one
    composition per job, and a ``${now:...}`` run directory evaluated once.
    """

    def __init__(self, config_search_path: ConfigSearchPath) -> None:
        super().__init__(config_search_path=config_search_path)
        self._composed: dict[tuple[str | None, tuple[str, ...], RunMode], DictConfig] = {}

    def load_configuration(
        self, config_name: str | None, overrides: list[str], run_mode: RunMode, from_shell: bool = True,
        validate_sweep_overrides: bool = True,
    ) -> DictConfig:
        key = (config_name, tuple(overrides), run_mode)
        if key not in self._composed:
            self._composed[key] = super().load_configuration(
                config_name, overrides, run_mode, from_shell=from_shell, validate_sweep_overrides=validate_sweep_overrides
            )
        return self._composed[key]


@contextmanager
def hydra_session(
    primary_dir: str | None = None, extra_config_dir: str | None = None, task_name: str = PRIMARY_CONFIG
) -> Iterator[Hydra]:
    """Hydra initialised on the packaged configs (or on ``primary_dir``, like ``--config-path``; with
    ``extra_config_dir`` searched next, like ``--config-dir``), its loader a :class:`ComposeOnce`.

    Also usable inside a running Hydra app (or another compose session): Hydra's global state is set
    aside and restored afterwards.
    """
    register_configs()
    search_path = create_config_search_path(primary_dir or str(config_dir()))
    if extra_config_dir is not None:  # where hydra.main puts --config-dir: before the structured configs
        search_path.prepend("command-line", f"file://{_extra_dir(extra_config_dir)}", SearchPathQuery(provider="schema"))
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        version.setbase("1.3")
        hydra = Hydra(task_name=task_name, config_loader=ComposeOnce(search_path))
        GlobalHydra.instance().initialize(hydra)
        yield hydra
    finally:
        restore_gh_from_backup(backup)


def _extra_dir(extra_config_dir: str) -> Path:
    path = Path(extra_config_dir).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"The extra config directory '{extra_config_dir}' (--config-dir) does not exist.")
    return path


def rewrite_output_dir(overrides: Sequence[str], *, multirun: bool) -> list[str]:
    """Turn ``output_dir=PATH`` into ``hydra.run.dir=PATH`` (``hydra.sweep.dir`` with ``-m``).

    ``output_dir`` itself stays ``${hydra:runtime.output_dir}``, so the whole run, Hydra's ``.hydra/``
    folder included, lands in PATH and ``output_dir`` resolves to its absolute form. (Interpolating
    hydra.run.dir from output_dir is not possible: output_dir is defined from Hydra's run directory.)
    """
    parser = OverridesParser.create()
    out: list[str] = []
    for line in overrides:
        try:
            override = parser.parse_override(line)
        except HydraException as err:
            raise parse_error(err, line) from err
        if override.key_or_group != OUTPUT_DIR_KEY or override.package is not None:
            out.append(line)
            continue
        if override.is_sweep_override():
            raise ConfigError(
                f"'{line}' sweeps the output directory, which Hydra cannot do: with -m every job already gets "
                f"its own directory under output_dir. Give one path (output_dir=PATH) or set hydra.sweep.subdir."
            )
        if override.is_delete():
            raise ConfigError(f"'{line}' removes output_dir, which every run needs. Give output_dir=PATH instead.")
        value = override.get_value_element_as_str()
        out.append(f"hydra.{'sweep' if multirun else 'run'}.dir={value}")
    return out


def rank_overrides(rank: int, scratch_dir: str) -> list[str]:
    """Overrides for ranks other than 0 under a multi-process launch.

    They must not create anything in the user's output tree (rank 0 owns it and broadcasts its resolved
    output_dir): their Hydra run directory is a throw-away ``scratch_dir``, without ``.hydra/`` and without
    a log file.
    """
    if rank == 0:
        return []
    return [
        f"hydra.run.dir={scratch_dir}",
        f"hydra.sweep.dir={scratch_dir}",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
    ]


def process_rank() -> int:
    """This process's global rank under a launcher (RANK, else LOCAL_RANK), 0 when not launched."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"The environment variable {name}='{value}' is not an integer rank.") from None
    return 0


def compose_train_config(
    overrides: Sequence[str] = (), *, require_complete: bool = True, config_name: str = PRIMARY_CONFIG
) -> DictConfig:
    """Compose configs/train.yaml (or ``config_name``: "reward" for ``rlhf reward``) with ``overrides``
    and validate it, without running a Hydra app.

    The result has no ``hydra`` node and is fully resolved. ``output_dir`` is the absolute directory a
    run with these overrides would use: ``output_dir=PATH`` if given, else Hydra's ``hydra.run.dir``
    (``outputs/<date>/<time>``, evaluated now). Nothing is created on disk. Raises ConfigError with one
    paragraph for any user mistake (unknown key or option, wrong type, invalid value).
    """
    overrides = rewrite_output_dir(list(overrides), multirun=False)
    with hydra_session():
        try:
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise explain(err, overrides, list_length=partial(_list_length, config_name, overrides), command=config_name) from err
    run_dir = os.path.abspath(str(cfg.hydra.run.dir))
    with open_dict(cfg):
        del cfg["hydra"]
    cfg[OUTPUT_DIR_KEY] = run_dir
    return finalize(cfg, require_complete=require_complete, overrides=overrides, config_name=config_name)


def finalize(
    cfg: DictConfig,
    *,
    require_complete: bool = True,
    overrides: Sequence[str] = (),
    validate: bool = True,
    config_name: str = PRIMARY_CONFIG,
) -> DictConfig:
    """Validate (unless the caller already has: ``validate=False``) against the schema of
    ``config_name`` ("train" or "reward"), then resolve every interpolation in place (the config is
    resolved once, here).

    ``output_dir`` is made absolute. Raises ConfigError for invalid values or unresolvable interpolations.
    """
    try:
        if validate:
            validate_config(cfg, require_complete=require_complete, command=config_name)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        raise explain(err, overrides, command=config_name) from err
    cfg[OUTPUT_DIR_KEY] = os.path.abspath(str(cfg[OUTPUT_DIR_KEY]))
    return cfg


def compose_jobs(
    hydra: Hydra,
    overrides: Sequence[str],
    *,
    multirun: bool,
    require_complete: bool,
    command: str = PRIMARY_CONFIG,
    config_name: str | None = None,
    config_dirs: Sequence[str | Path] = (),
) -> list[tuple[list[str], DictConfig]]:
    """Compose and validate the config of every job the command line describes, as ``hydra``'s run
    (``multirun``: its basic sweeper and launcher) will ask its loader for them, so that running the
    same ``overrides`` then composes nothing again (:class:`ComposeOnce`).

    ``command``: the subcommand (its schema; the command its messages name); ``config_name``: its
    primary config (default: the command's own). Returns (job overrides, config with its ``hydra``
    node) per job; ConfigError on the first mistake.
    Sweep kinds the basic sweeper cannot expand (intervals for optimiser sweepers) are validated with
    that override left out.
    """
    dirs = list(config_dirs) or [config_dir()]
    config_name = config_name or command
    explained = partial(_explained, config_name=config_name, command=command, dirs=dirs)
    if not multirun:
        with explained(list(overrides)):
            cfg = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.RUN, from_shell=False)
            validate_config(cfg, require_complete=require_complete, command=command)
        return [(list(overrides), cfg)]
    with explained(list(overrides)):
        sweep = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.MULTIRUN, from_shell=False)
    str(sweep.hydra.sweep.dir)  # its ${now:...} evaluated once, before every job copies the sweep's cache
    jobs = _expand_sweeps(sweep, dirs, command)
    out = []
    for number, job in enumerate(jobs):
        where = f"In sweep job {number} ({' '.join(job)}): " if len(jobs) > 1 else ""
        with explained(job, where=where):
            cfg = hydra.config_loader.load_sweep_config(sweep, job)
            validate_config(cfg, require_complete=require_complete, command=command)
        out.append((job, cfg))
    return out


@contextmanager
def _explained(
    overrides: list[str], *, config_name: str, command: str, dirs: list[str | Path], where: str = ""
) -> Iterator[None]:
    """Hydra's and OmegaConf's composition errors as one ConfigError paragraph, prefixed by ``where``."""
    try:
        yield
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        lengths = partial(_list_length, config_name, overrides)
        error = err if isinstance(err, ConfigError) else explain(err, overrides, dirs, lengths, command)
        raise (ConfigError(where + str(error)) if where else error) from err


def _list_length(config_name: str, overrides: list[str], key: str) -> int | None:
    """Length of the list at ``key`` in the config composed without the overrides that set into it
    (for the message about an index past its end); None if that does not compose either."""
    inside = (f"{key}.", f"{key}[")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(inside)]
    try:
        value = OmegaConf.select(compose(config_name, overrides=kept), key)
    except (HydraException, OmegaConfBaseException):
        return None
    return len(value) if OmegaConf.is_list(value) else None


def _expand_sweeps(sweep: DictConfig, config_dirs: list[str | Path], command: str) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper forms them from the sweep's config (its
    ``hydra.sweeper.params``, then the command line's; the cartesian product of the sweeps)."""
    params = OmegaConf.select(sweep, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += OmegaConf.to_container(sweep.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    try:
        parsed = parser.parse_overrides(arguments)
        expandable = [o for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
        (batch,) = BasicSweeper.split_arguments(expandable, max_batch_size=None)
    except (HydraException, OmegaConfBaseException) as err:
        raise explain(err, arguments, config_dirs, command=command) from err
    return [list(job) for job in batch]
