"""Where the Hydra configs and the recipes live, for installed and source-checkout layouts.

A wheel carries ``configs/`` and ``recipes/`` inside the package as ``rlhf_cli/_configs`` and
``rlhf_cli/_recipes`` (hatch force-include); an editable install or a plain checkout has them at the
repository root, next to the package. The installed location wins so that a wheel never picks up a
stray checkout from the working directory.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_cli.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _locate(installed_name: str, checkout_name: str, marker: str) -> Path:
    """The first candidate directory holding ``marker`` (a file name or a glob)."""
    candidates = (PACKAGE_DIR / installed_name, PACKAGE_DIR.parent / checkout_name)
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob(marker)):
            return candidate
    raise ConfigError(
        f"Cannot find the rlhf_cli '{checkout_name}' directory: looked for {marker} in "
        + " and ".join(str(c) for c in candidates)
        + ". The installation is incomplete; reinstall the package (pip install rlhf-cli, or pip install -e . "
        "from a source checkout that still has its configs/ and recipes/ folders)."
    )


def config_dir() -> Path:
    """Absolute path of the directory holding train.yaml and the config groups."""
    return _locate("_configs", "configs", "train.yaml")


def recipes_dir() -> Path:
    """Absolute path of the directory holding one YAML per recipe."""
    return _locate("_recipes", "recipes", "*.yaml")


def recipe_files() -> dict[str, Path]:
    """Recipe name (file stem) -> YAML path, sorted by name."""
    return {path.stem: path for path in sorted(recipes_dir().glob("*.yaml"))}


def reward_recipe_files() -> dict[str, Path]:
    """``rlhf reward``'s recipes (recipes/reward/NAME.yaml): name -> YAML path, sorted by name."""
    return {path.stem: path for path in sorted((recipes_dir() / "reward").glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """The one-line description: the first comment line of the recipe that is not a ``# @package`` header."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            stripped = line.strip()
            if not stripped.startswith("#"):
                break
            text = stripped.lstrip("#").strip()
            if text and not text.startswith("@package"):
                return text
    return ""


# configs/ subdirectories that are not Hydra config groups (files for other tools).
NOT_CONFIG_GROUPS = ("accelerate",)


def group_options() -> dict[str, list[str]]:
    """Config group -> its option names, as found in configs/ (accelerate launch files excluded)."""
    root = config_dir()
    groups = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_CONFIG_GROUPS):
        options = sorted(path.stem for path in folder.glob("*.yaml"))
        if options:
            groups[folder.name] = options
    return groups
