"""llama.cpp GGUF checkpoints as models (``model.gguf_file``).

transformers reads GGUF itself (``from_pretrained(..., gguf_file=...)``, which needs the ``gguf``
package): it de-quantises every tensor and rebuilds the config and the tokenizer from the file's
metadata. That takes seconds to minutes and a run loads its model several times (``rlhf train``,
``rlhf eval``, ``rlhf sample --reference``), so the file is converted ONCE into a plain Hugging Face
directory in the user cache and every later load reads that directory like any other local model:

    $RLHF_CLI_CACHE (else $XDG_CACHE_HOME/rlhf_cli, else ~/.cache/rlhf_cli)
        /gguf/<sha256 of the file, 20 hex digits>-<dtype>/   config.json, model.safetensors, tokenizer files, source.json

The directory is written under a temporary name and renamed when complete, so a crash (or a second
process converting the same file at the same time) never leaves a half-written model that a later
run would load. The key is the file's content, not its path: a moved file is not converted again,
and a changed file is.

Everything a user can get wrong (no such file, ``gguf`` missing, an architecture transformers cannot
read from GGUF) is checked by :func:`check_gguf` from the file's header alone, before any weights load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_cli.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from rlhf_cli.config.schema import ModelConfig

# Bump when the converted directory's layout or contents change, so old conversions are not reused.
CONVERSION_VERSION = 1
# The optional extra that installs the reader: pip install 'rlhf-cli[gguf]'.
EXTRA = "gguf"
_COMPLETE_MARKER = "source.json"  # written last into the staging directory


def gguf_file_path(model_cfg: "ModelConfig") -> Path | None:
    """The ``.gguf`` file ``model_cfg`` names, or None when ``model.gguf_file`` is unset.

    ``model.gguf_file`` is a path to the file (absolute, or relative to the working directory), or a
    file name inside the directory ``model.name_or_path``; ``model.name_or_path`` may also be the path
    of a ``.gguf`` file itself. The file must exist.
    """
    if not model_cfg.gguf_file:
        name = str(model_cfg.name_or_path or "")
        if model_cfg.source != "pretrained" or not name.endswith(".gguf"):
            return None
        return _existing(Path(os.path.expanduser(name)), given=name, key="model.name_or_path")
    if model_cfg.source != "pretrained":
        raise ConfigError(
            f"model.gguf_file is set, but model.source={model_cfg.source}; a GGUF checkpoint is a pretrained model. "
            "Set model.source=pretrained (e.g. model=local model.gguf_file=/path/to/model.gguf), or unset model.gguf_file."
        )
    given = Path(os.path.expanduser(str(model_cfg.gguf_file)))
    candidates = [given]
    if model_cfg.name_or_path and not given.is_absolute():
        candidates.insert(0, Path(os.path.expanduser(str(model_cfg.name_or_path))) / given)
    return _existing(*candidates, given=str(model_cfg.gguf_file), key="model.gguf_file")


def _existing(*candidates: Path, given: str, key: str) -> Path:
    """The first of ``candidates`` that is a file (resolved), or the "does not exist" error for ``key``."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = " and ".join(f"'{c}'" for c in candidates)
    raise ModelLoadError(
        f"The GGUF file {key}='{given}' does not exist (looked for {looked}). Set model.gguf_file= to the path "
        "of a .gguf file (or to its file name, with model.name_or_path= its directory)."
    )


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` recorded in a GGUF file's header (only the header is read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:  # not a GGUF file, truncated, wrong magic
        raise ModelLoadError(f"'{path}' is not a readable GGUF file ({err}). Point model.gguf_file= at a .gguf checkpoint.") from err
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"The GGUF file '{path}' records no general.architecture, so transformers cannot tell which model it holds.")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return list(GGUF_SUPPORTED_ARCHITECTURES)


def check_gguf(model_cfg: "ModelConfig") -> Path | None:
    """The GGUF file of ``model_cfg`` after checking it can be loaded (None if unset); a one-paragraph
    error otherwise. Reads only the file's header, so it is cheap to call before anything heavy."""
    path = gguf_file_path(model_cfg)
    if path is None:
        return None
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"model.gguf_file needs the 'gguf' package to read '{path.name}', and it is not installed. Run "
            f"`pip install 'rlhf-cli[{EXTRA}]'` (or `pip install gguf`)."
        )
    architecture = gguf_architecture(path)
    supported = _supported_architectures()
    if architecture not in supported:
        import transformers

        raise ModelLoadError(
            f"The GGUF file '{path}' holds a '{architecture}' model, which transformers {transformers.__version__} cannot "
            f"load from GGUF (it reads: {', '.join(sorted(supported))}). Use a GGUF of one of those architectures, or "
            "the model in Hugging Face format (model.name_or_path=DIR, model.gguf_file=null)."
        )
    return path


def conversion_dtype(dtype: str) -> str:
    """The dtype the de-quantised weights are stored in. A GGUF holds quantised blocks, not a float
    dtype a checkpoint could call its own, so ``auto`` means float32 (what the de-quantiser yields)."""
    return "float32" if dtype == "auto" else dtype


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (a 100 MB file takes well under a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(path: Path, dtype: str, sha256: str | None = None) -> Path:
    """Where the conversion of the GGUF file ``path`` to ``dtype`` is (or will be) cached."""
    from rlhf_cli.data.tokenizer import cache_root

    sha = sha256 or file_sha256(path)
    return cache_root() / "gguf" / f"{sha[:20]}-{conversion_dtype(dtype)}-v{CONVERSION_VERSION}"


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` holds a complete conversion (its marker is written last)."""
    return (directory / _COMPLETE_MARKER).is_file()


def ensure_converted(path: Path, dtype: str) -> Path:
    """The Hugging Face directory converted from the GGUF file ``path`` in ``dtype``, converting it now
    if no earlier run has."""
    sha = file_sha256(path)
    target = converted_dir(path, dtype, sha)
    if not is_converted(target):
        convert_gguf(path, dtype, target, sha256=sha)
    return target


def convert_gguf(path: Path, dtype: str, target: Path, *, sha256: str) -> None:
    """De-quantise the GGUF file ``path`` to ``dtype`` through transformers and save model and tokenizer
    into ``target`` (staged in a sibling temporary directory, renamed into place when complete)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from rlhf_cli.models.model_facts import dtype_kwargs
    from rlhf_cli.models.value_head import is_seq2seq_config

    stored = conversion_dtype(dtype)
    directory, name = str(path.parent), path.name
    _announce(path, target)
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        model_class = AutoModelForSeq2SeqLM if is_seq2seq_config(config) else AutoModelForCausalLM
        model = model_class.from_pretrained(
            directory, gguf_file=name, config=config, **dtype_kwargs(getattr(torch, stored)), **_dense_loading_kwargs()
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as err:  # an architecture or tokenizer the reader rejects
        raise ModelLoadError(
            f"transformers {transformers.__version__} could not convert the GGUF file '{path}': {err}. Use a GGUF "
            "of an architecture transformers reads, or the model in Hugging Face format (model.name_or_path=DIR)."
        ) from err
    _detach_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"gguf_file": str(path), "sha256": sha256, "dtype": stored,
                  "transformers": transformers.__version__, "conversion_version": CONVERSION_VERSION}
        (staging / _COMPLETE_MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is as readable as any other
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its complete conversion into place first; keep that one.
            if not is_converted(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _dense_loading_kwargs() -> dict[str, Any]:
    """``from_pretrained`` arguments that make every weight a plain dense tensor.

    transformers 5 loads GGUF through a quantizer that keeps quantised weights packed whenever a GGUF
    matmul kernel is installed; a training policy needs ordinary float parameters, so de-quantisation is
    asked for explicitly. Older transformers have no such quantizer and always de-quantise.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _detach_gguf_quantizer(model: Any) -> None:
    """Forget the (de-quantised) GGUF origin so the model saves as an ordinary checkpoint.

    transformers 5 keeps the GGUF quantizer on the model and refuses to ``save_pretrained`` it even
    after de-quantising; its own ``remove_quantization_config`` is what ``model.dequantize()`` calls
    after unpacking. Older transformers attach no quantizer.
    """
    quantizer = getattr(model, "hf_quantizer", None)  # the attribute only exists on quantised loads
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _announce(path: Path, target: Path) -> None:
    """One line on stderr: the first load of a GGUF file takes a while, and is the only slow one."""
    from rich.console import Console

    Console(stderr=True).print(f"Converting the GGUF file {path} once into {target} (later runs load it from there).",
                               soft_wrap=True, markup=False, highlight=False)


def resolve_gguf(model_cfg: "ModelConfig") -> "ModelConfig":
    """``model_cfg`` itself when it names no GGUF file; otherwise a copy whose ``name_or_path`` is the
    converted Hugging Face directory (converted now if needed) and whose ``gguf_file`` is unset, so the
    usual loading code builds policy, reference and tokenizer from it."""
    path = check_gguf(model_cfg)
    if path is None:
        return model_cfg
    directory = str(ensure_converted(path, str(model_cfg.dtype)))
    return _with_fields(model_cfg, name_or_path=directory, gguf_file=None, revision=None)


def _with_fields(model_cfg: Any, **fields: Any) -> Any:
    """A copy of a model config (a DictConfig from Hydra, or the schema dataclass) with ``fields`` replaced."""
    if dataclasses.is_dataclass(model_cfg):
        return dataclasses.replace(model_cfg, **fields)
    from omegaconf import OmegaConf

    copy = OmegaConf.merge(model_cfg, fields)  # a new node; the run's frozen config is left as it is
    OmegaConf.set_readonly(copy, True)
    return copy
