"""Telling Hugging Face Hub ids from local paths, and saying clearly when the Hub is out of reach.

Loading code calls :func:`check_loadable` before handing a name to ``from_pretrained`` so that a
missing local directory or an uncached Hub id while offline fails at once with a message that
says which config key to point at a local copy, instead of a long network timeout or a deep
``OSError``. :func:`check_offline_downloads` does the same for a whole training config before
anything loads, so an offline run that needs several Hub downloads names all of them at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.errors import DataError, ModelLoadError

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """True when the user (or the test suite) told Hugging Face libraries not to touch the network."""
    return _flag("HF_HUB_OFFLINE") or _flag("TRANSFORMERS_OFFLINE")


def datasets_offline() -> bool:
    """True when ``datasets`` will not download: the Hub is offline or HF_DATASETS_OFFLINE is set."""
    return hub_offline() or _flag("HF_DATASETS_OFFLINE")


def _offline_flags(*, datasets: bool) -> str:
    """The offline variables that are set, for messages ("HF_HUB_OFFLINE is set"); HF_DATASETS_OFFLINE
    only matters when ``datasets`` downloads are concerned."""
    candidates = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    names = [name for name in candidates if _flag(name)]
    return f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} set"


def looks_like_local_path(name: str) -> bool:
    """A name the user meant as a path: it exists, or is written like one (./x, /x, ~/x, x/y/z, ..)."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep) and name.count("/") > 1:
        return True
    return name.endswith(os.sep)


def is_cached_on_hub_cache(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    """Whether ``filename`` of ``repo_id`` is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except ValueError:  # not a valid repo id at all
        return False
    return isinstance(found, str)


def is_dataset_cached(repo_id: str) -> bool:
    """Whether the Hub dataset ``repo_id`` left files in the Hub cache or in the ``datasets`` cache."""
    import datasets.config
    from huggingface_hub import constants

    hub_dir = Path(constants.HF_HUB_CACHE) / ("datasets--" + repo_id.replace("/", "--"))
    prepared_dir = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub_dir.is_dir() or prepared_dir.is_dir()


def check_loadable(name: str, *, what: str, config_key: str, filename: str = "config.json", repo_type: str = "model") -> None:
    """Fail early, with one paragraph, if ``name`` can be neither a local directory nor a Hub download.

    ``what`` names the thing for the user ("policy model", "reward classifier"); ``config_key`` is the
    override that points it elsewhere (``model.name_or_path``).
    """
    path = Path(os.path.expanduser(name))
    if path.exists():
        return
    if looks_like_local_path(name):
        raise ModelLoadError(
            f"The {what} path '{name}' does not exist. Point {config_key}=... at an existing local "
            f"directory (one written by save_pretrained) or at a Hugging Face Hub id."
        )
    if hub_offline() and not is_cached_on_hub_cache(name, filename, repo_type):
        raise ModelLoadError(
            f"The {what} '{name}' is a Hugging Face Hub id, but the Hub is offline (HF_HUB_OFFLINE is set) "
            f"and it is not in the local cache. Download it on a machine with network access "
            f"(e.g. save_pretrained into a directory) and set {config_key}=/path/to/that/directory, "
            f"or unset HF_HUB_OFFLINE if this machine can reach the Hub."
        )


def hub_failure_message(name: str, *, what: str, config_key: str, error: BaseException) -> str:
    """The message for a load that went to the Hub and failed (no network, unknown repo, auth)."""
    return (
        f"Could not load the {what} '{name}' ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}). "
        f"If this machine has no network access, download it elsewhere, copy the directory here and set "
        f"{config_key}=/path/to/it; if it is a local path, check that it exists and holds a saved model."
    )


@dataclass(frozen=True)
class HubDownload:
    """Something a run would fetch from the Hub: ``name`` read from ``config_key``; ``local_override``
    is the command-line override that points the run at a local copy instead."""

    what: str
    name: str
    config_key: str
    local_override: str
    filename: str = "config.json"
    repo_type: str = "model"


def _is_hub_id(name: Any) -> bool:
    return bool(name) and not looks_like_local_path(str(name))


def _local_name(name: str) -> str:
    return "/path/to/" + name.rstrip("/").rsplit("/", 1)[-1]


def hub_downloads(cfg: Any) -> list[HubDownload]:
    """The Hub ids a composed ``rlhf train`` config (DictConfig, read by attribute) would download.

    Names that exist on disk or are written like paths are not downloads; unset names are left to the
    loaders, which say what is missing.
    """
    found: list[HubDownload] = []
    model = cfg.model
    if model.source == "pretrained":
        if _is_hub_id(model.name_or_path):
            name = str(model.name_or_path)
            found.append(HubDownload("policy model", name, "model.name_or_path", f"model.name_or_path={_local_name(name)}"))
        if _is_hub_id(model.tokenizer_name_or_path):
            name = str(model.tokenizer_name_or_path)
            found.append(HubDownload("tokenizer", name, "model.tokenizer_name_or_path",
                                     f"model.tokenizer_name_or_path={_local_name(name)}", filename="tokenizer_config.json"))
    reward = cfg.reward
    sources = ([(f"reward.components[{i}]", part) for i, part in enumerate(reward.components)]
               if reward.type == "weighted_sum" else [("reward", reward)])
    for prefix, source in sources:
        if source.type == "classifier" and _is_hub_id(source.model):
            name = str(source.model)
            found.append(HubDownload("reward classifier", name, f"{prefix}.model", f"{prefix}.model={_local_name(name)}"))
    dataset = cfg.dataset
    if dataset.source == "hub" and _is_hub_id(dataset.path):
        name = str(dataset.path)
        local_file = f"{_local_name(name)}_{dataset.split}.jsonl"
        found.append(HubDownload("dataset", name, "dataset.path", f"dataset=files dataset.data_files=[{local_file}]",
                                 repo_type="dataset"))
    return found


def _is_cached(download: HubDownload) -> bool:
    if download.repo_type == "dataset":
        return is_dataset_cached(download.name)
    return is_cached_on_hub_cache(download.name, download.filename, download.repo_type)


def check_offline_downloads(cfg: Any) -> None:
    """Offline, fail before anything loads if the run needs Hub files that are not cached, naming every
    one of them and the overrides that point the run at local copies. Online it does nothing: whether
    a download will work is only known by trying."""
    missing = [
        download
        for download in hub_downloads(cfg)
        if (datasets_offline() if download.repo_type == "dataset" else hub_offline()) and not _is_cached(download)
    ]
    if not missing:
        return
    items = [f"the {d.what} '{d.name}' ({d.config_key})" for d in missing]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    has_model = any(d.repo_type == "model" for d in missing)
    has_dataset = any(d.repo_type == "dataset" for d in missing)
    how = []
    if has_model:
        how.append("save_pretrained for a model")
    if has_dataset:
        how.append("the split saved as a .jsonl, .csv or .parquet file for a dataset")
    several = len(missing) > 1
    them, they_are = ("them", "they are") if several else ("it", "it is")
    raise (ModelLoadError if has_model else DataError)(
        f"This run needs {listing} from the Hugging Face Hub, but the Hub is offline "
        f"({_offline_flags(datasets=has_dataset)}) and {they_are} not in the local cache. Fetch "
        f"{'copies' if several else 'a copy'} on a machine with network access ({'; '.join(how)}), bring {them} here "
        f"and point the run at {them}: {' '.join(d.local_override for d in missing)}. Or unset the offline flag if "
        f"this machine can reach the Hub."
    )
