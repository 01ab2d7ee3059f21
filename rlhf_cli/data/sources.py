"""Loading the raw text dataset named by ``dataset.source``: imdb_local | hub | files.

Every loader returns a ``datasets.Dataset`` that has a string column ``cfg.text_column``; cleaning,
filtering and tokenising happen later, in :mod:`rlhf_cli.data.prompts`.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rlhf_cli.errors import DataError
from rlhf_cli.hub import datasets_offline, is_dataset_cached

if TYPE_CHECKING:
    import datasets

# File extension -> datasets builder; ".gz" and friends are read through transparently.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_FORMAT_HINTS = {"json": " (one JSON object per line, or one JSON list of objects)", "csv": " (with a header row)"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = ("*", "?", "[")


def load_text_dataset(cfg: Any, split: str | None = None) -> "datasets.Dataset":
    """The dataset described by ``cfg`` (a DatasetConfig), checked to have the text column.

    ``split`` overrides ``cfg.split`` (used for ``cfg.eval_split``).
    """
    split = cfg.split if split is None else split
    loaders: dict[str, Callable[[Any, str], "datasets.Dataset"]] = {
        "imdb_local": _load_imdb_local,
        "hub": _load_hub,
        "files": _load_files,
    }
    if cfg.source not in loaders:
        raise DataError(
            f"Unknown dataset.source '{cfg.source}'; valid sources are {', '.join(loaders)}. "
            f"Use imdb_local for the packaged IMDb reviews, hub with dataset.path=<Hub id>, or files with "
            f"dataset.data_files=[...]."
        )
    dataset = loaders[cfg.source](cfg, split)
    check_text_column(dataset, cfg.text_column, describe_source(cfg, split))
    return dataset


def describe_source(cfg: Any, split: str | None = None) -> str:
    """A short human description of the dataset for messages ("hub dataset 'imdb' (split train)")."""
    split = cfg.split if split is None else split
    if cfg.source == "files":
        return f"files {list(cfg.data_files)}"
    if cfg.source == "hub":
        subset = f", subset {cfg.name}" if cfg.name else ""
        return f"hub dataset '{cfg.path}' (split {split}{subset})"
    return f"{cfg.source} dataset (split {split})"


def check_text_column(dataset: "datasets.Dataset", column: str, where: str) -> None:
    """Raise DataError unless ``column`` exists in ``dataset`` and holds strings."""
    import datasets

    string_columns = [
        name
        for name, feature in dataset.features.items()
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    ]
    if column not in dataset.column_names:
        candidates = string_columns or list(dataset.column_names)
        closest = difflib.get_close_matches(column, candidates, n=1, cutoff=0.0)
        hint = f" Set dataset.text_column={closest[0]}." if closest else ""
        raise DataError(
            f"The {where} has no column '{column}' (dataset.text_column); its columns are "
            f"{', '.join(dataset.column_names) or '(none)'}.{hint}"
        )
    if column not in string_columns and _is_message_list(dataset.features[column]):
        return  # conversational prompts: rendered by the tokenizer's chat template (data.chat_prompts)
    if column not in string_columns:
        raise DataError(
            f"Column '{column}' of the {where} holds {dataset.features[column]}, not text. Set "
            f"dataset.text_column to a text column"
            + (f" (text columns: {', '.join(string_columns)})." if string_columns else ".")
        )


def _is_message_list(feature: Any) -> bool:
    """A column of lists of {role, content} records (how datasets reads chat messages from json)."""
    inner = getattr(feature, "feature", None)
    if isinstance(feature, list) and feature:
        inner = feature[0]
    return isinstance(inner, dict) and "role" in inner and "content" in inner if inner is not None else False


@contextlib.contextmanager
def datasets_quiet(*, errors: bool = False) -> Iterator[None]:
    """Hide datasets' progress bars (in-memory maps, reading local files: noise on the console, and on
    stderr in front of an error message); restore the caller's setting after. Hub downloads keep theirs.

    ``errors``: also hide the library's own ERROR log lines (its json reader logs the parse error before
    raising); the caller turns the exception into one message of ours that says the same, better.
    """
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    if errors:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if enabled:
            datasets.enable_progress_bars()


def _load_imdb_local(cfg: Any, split: str) -> "datasets.Dataset":
    from rlhf_cli.data.imdb_local import load_imdb_reviews

    # Cleaning is left to the prompt pipeline, which applies dataset.clean_html to every source alike.
    return load_imdb_reviews(split, clean_html=False)


def _load_hub(cfg: Any, split: str) -> "datasets.Dataset":
    import datasets

    if not cfg.path:
        raise DataError(
            "dataset.source=hub needs dataset.path=<Hub dataset id> (e.g. stanfordnlp/imdb), or use "
            "dataset.source=imdb_local for the packaged IMDb reviews."
        )
    is_local_dir = Path(os.path.expanduser(cfg.path)).is_dir()
    if not is_local_dir and datasets_offline() and not is_dataset_cached(cfg.path):
        raise DataError(
            f"dataset.path={cfg.path} is a Hugging Face Hub dataset, but the Hub is offline "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and it is not in the local cache. Use local "
            f"files instead (dataset.source=files dataset.data_files=[reviews.jsonl]), or the packaged "
            f"IMDb reviews (dataset.source=imdb_local), or unset the offline flag on a machine with network."
        )
    try:
        return datasets.load_dataset(cfg.path, cfg.name, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise DataError(
            f"Could not load the {describe_source(cfg, split)}: {type(err).__name__}: {err}. Check "
            f"dataset.path, dataset.name and dataset.split, or use dataset.source=files with local files."
        ) from err


def _expand_data_files(patterns: list[str], key: str = "dataset.data_files") -> list[str]:
    """Absolute paths of ``key`` (the config key naming the files); globs expanded (sorted); missing
    files are an error."""
    if not patterns:
        raise DataError(f"{key.rsplit('.', 1)[0]}.source=files needs {key}=[path, ...] (json, jsonl, csv, parquet or txt files).")
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if any(char in pattern for char in _GLOB_CHARS):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"{key} pattern '{pattern}' matches no file (looked from {os.getcwd()}).")
            paths.extend(os.path.abspath(match) for match in matches)
        elif not os.path.isfile(pattern):
            raise DataError(
                f"{key} names '{pattern}', which is not a file (resolved to "
                f"{os.path.abspath(pattern)}). Fix the path; relative paths are relative to {os.getcwd()}."
            )
        else:
            paths.append(os.path.abspath(pattern))
    return paths


def checked_data_files(patterns: list[str], key: str = "dataset.data_files") -> tuple[list[str], str]:
    """The absolute paths of ``key`` (the config key naming the files) and the ``datasets`` builder
    that reads them; a DataError if one is missing, empty, of an unknown format, or the formats are
    mixed. Reads no data (and imports no ``datasets``), so the command line runs it before anything heavy loads."""
    paths = _expand_data_files(patterns, key)
    builders = {path: _builder_for(path, key) for path in paths}
    if len(set(builders.values())) > 1:
        listing = "; ".join(f"{path} -> {builder}" for path, builder in builders.items())
        raise DataError(
            f"{key} mixes file formats ({listing}). Use files of one format (e.g. all .jsonl)."
        )
    _check_not_empty(paths, key)
    return paths, next(iter(builders.values()))


def _builder_for(path: str, key: str = "dataset.data_files") -> str:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    extension = os.path.splitext(name)[1]
    if extension not in FILE_BUILDERS:
        raise DataError(
            f"{key} has '{path}' with extension '{extension or '(none)'}'; supported "
            f"extensions are {', '.join(FILE_BUILDERS)} (optionally compressed)."
        )
    return FILE_BUILDERS[extension]


def _load_files(cfg: Any, split: str) -> "datasets.Dataset":
    if split != "train":
        raise DataError(
            f"dataset.source=files reads all dataset.data_files as one table, so it has no split "
            f"'{split}'. Leave dataset.split=train and dataset.eval_split=null; held-out prompts are "
            f"then split off with dataset.eval_size."
        )
    return read_data_files(list(cfg.data_files), csv_options=text_csv_options([cfg.text_column]))


def text_csv_options(texts: list[str], optional: tuple[str, ...] | list[str] = ()) -> dict:
    """pandas ``read_csv`` settings that keep the ``texts`` columns text: left to itself it reads '',
    'NA', 'None', 'null' as missing values and ' 10' as the number 10 (space lost), so a prompt or a
    pair would be dropped, refused, or scored on other text. Only an empty cell of an ``optional``
    (numeric) column is a missing value."""
    return {"converters": {c: str for c in texts}, "keep_default_na": False, "na_values": {c: [""] for c in optional}}


def read_data_files(patterns: list[str], key: str = "dataset.data_files", *, csv_options: dict | None = None) -> "datasets.Dataset":
    """The rows of every file ``patterns`` names (one format), as one Dataset; ``key`` is the config key
    the messages name. ``csv_options``: extra pandas ``read_csv`` settings, used when the files are csv.
    Missing, empty, mixed-format and malformed files are a DataError."""
    import datasets

    paths, builder = checked_data_files(patterns, key)
    options = dict(csv_options or {}) if builder == "csv" else {}
    try:
        with datasets_quiet(errors=True):  # no "Generating train split" bar for a local read
            return datasets.load_dataset(builder, data_files=paths, split="train", **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        bad_line = _first_bad_json_line(paths) if builder == "json" else None
        if bad_line is not None:
            raise DataError(bad_line + " Fix or remove that line (jsonl: one JSON object per line).") from err
        raise DataError(
            f"Could not read {key} {paths} as {builder}: {type(err).__name__}: {err}. "
            f"Check that the files are valid {builder}{_FORMAT_HINTS.get(builder, '')}."
        ) from err


def _check_not_empty(paths: list[str], key: str = "dataset.data_files") -> None:
    """A DataError naming the first file with no data (datasets' readers fail on one with a traceback)."""
    for path in paths:
        is_compressed = path.lower().endswith(_COMPRESSION_SUFFIXES)
        size = os.path.getsize(path)
        # Small files are read to catch whitespace-only ones too; large ones surely hold something.
        if size == 0 or (not is_compressed and size < 4096 and not Path(path).read_bytes().strip()):
            raise DataError(
                f"The data file {path} ({key}) is empty. Point {key} at files that "
                f"hold the data, or remove this one from the list."
            )


def _first_bad_json_line(paths: list[str]) -> str | None:
    """'The data file F has a malformed JSON line: line N ...' for the first line of a JSON Lines file
    that is not a JSON object, or None (compressed files, and a .json file that is one JSON document)."""
    for path in paths:
        if path.lower().endswith(_COMPRESSION_SUFFIXES):
            continue
        problem = _bad_line_in(path)
        if problem is not None and path.lower().endswith(".json") and _is_one_document(path):
            continue  # not JSON Lines at all: datasets' own message stands
        if problem is not None:
            return f"The data file {path} has a malformed JSON line: {problem}."
    return None


def _bad_line_in(path: str) -> str | None:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                return f"line {number} is not valid JSON ({err})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object with a text field"
    return None


def _is_one_document(path: str) -> bool:
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:
        return False
    return True


def prompt_table_features() -> "datasets.Features":
    """The columns of a prompt table (``input_ids``: token ids, ``query``: the prompt's text), written once.
    ``datasets.List`` is 4.x's name for a list feature; 3.x (the supported floor) calls it ``Sequence``."""
    import datasets

    list_of = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features({"input_ids": list_of(datasets.Value("int64")), "query": datasets.Value("string")})
