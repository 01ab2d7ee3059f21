"""Model files shipped inside the package (so the wheel carries them): see each folder's README.md."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from rlhf_cli.errors import ModelLoadError

REVIEW_GPT2 = "review_gpt2"


def review_gpt2_dir(needs: str = "model.safetensors") -> Path:
    """The directory of the shipped review LM (a plain Hugging Face GPT-2 directory with its tokenizer),
    checked to hold the file ``needs``."""
    # The package is installed as files (hatch wheel, or an editable checkout), so the resource is a real path.
    directory = Path(str(importlib.resources.files(__name__) / REVIEW_GPT2))
    if not (directory / needs).is_file():
        raise ModelLoadError(
            f"The shipped review LM is missing from {directory} (no {needs}): the installation is "
            f"incomplete. Reinstall rlhf-cli, or rebuild the file with `python -m rlhf_cli.tools.pretrain_review_lm "
            f"{directory}`; or pick another model, e.g. model=tiny_gpt2."
        )
    return directory
