"""Telling Hugging Face Hub ids from local paths, and saying clearly when the Hub is out of reach.

Loading code calls :func:`check_loadable` before handing a name to ``from_pretrained`` so that a
missing local directory or an uncached Hub id while offline fails at once with a message that
says which config key to point at a local copy, instead of a long network timeout or a deep
``OSError``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_cli.errors import ModelLoadError


def hub_offline() -> bool:
    """True when the user (or the test suite) told Hugging Face libraries not to touch the network."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


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
