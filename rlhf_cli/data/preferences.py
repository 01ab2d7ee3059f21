"""Preference pairs as users have them: read, recognise the format, render, check, tokenise.

Three formats (``data.format=auto`` tells them apart by the columns and their types):

* **explicit**: ``prompt``, ``chosen``, ``rejected`` strings; the scored texts are prompt + chosen and
  prompt + rejected, joined as written (what ``rlhf train`` hands a reward);
* **implicit**: ``chosen`` and ``rejected`` are whole texts; their longest shared prefix, cut back to
  the last whitespace inside it, is the prompt;
* **conversational**: lists of ``{role, content}`` messages (``prompt`` optional: without it the
  shared leading messages are the prompt), rendered with the tokenizer's chat template; the prompt is
  rendered with the generation prompt, as ``rlhf train`` renders conversational prompts.

Optional columns: ``margin`` (float, a minimum score difference for the pair) and ``tie`` (bool);
other columns are ignored. Column names are configurable (``data.*_column``). Rows whose chosen and
rejected texts are identical are dropped with a notice; texts longer than ``data.max_length`` tokens
are truncated (keeping their end, see ``rlhf_cli.models.reward_scoring``) and counted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from rlhf_cli.errors import DataError

if TYPE_CHECKING:
    import datasets

FORMATS = ("auto", "explicit", "implicit", "conversational")
# data.ties: tied pairs carry no weight (skip) or are trained towards P = 0.5 (half).
TIE_MODES = ("skip", "half")
DATA_KEY = "data"


@dataclass
class PreferenceRows:
    """Pairs as text: each side is (prompt, response); the scored text is prompt + response.

    The two prompts of a pair are equal for user data; the IMDb default pairs snippets of two reviews
    with different openings. ``margins`` / ``ties`` are None when the data has no such column.
    """

    chosen_prompts: list[str]
    chosen: list[str]
    rejected_prompts: list[str]
    rejected: list[str]
    margins: Optional[list[float]] = None
    ties: Optional[list[bool]] = None
    notices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def chosen_texts(self) -> list[str]:
        return [p + r for p, r in zip(self.chosen_prompts, self.chosen)]

    @property
    def rejected_texts(self) -> list[str]:
        return [p + r for p, r in zip(self.rejected_prompts, self.rejected)]

    def select(self, indices: Sequence[int]) -> "PreferenceRows":
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return PreferenceRows(pick(self.chosen_prompts), pick(self.chosen), pick(self.rejected_prompts),
                              pick(self.rejected), pick(self.margins), pick(self.ties), list(self.notices))


@dataclass
class PreferencePairs:
    """Tokenised pairs: ids of the scored texts (already truncated), margin (0.0 if none), tie flags."""

    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: list[float]
    ties: list[bool]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.chosen_ids)


# Reading ---------------------------------------------------------------------------------------------
def read_preference_table(cfg: Any, split: str) -> "datasets.Dataset":
    """The raw rows of ``cfg`` (the ``data`` node, source files or hub)."""
    if cfg.source == "files":
        if split != cfg.split:
            raise DataError(f"{DATA_KEY}.source=files has no split '{split}'; held-out pairs come from {DATA_KEY}.eval_size.")
        return _read_files(cfg)
    if cfg.source == "hub":
        import datasets

        if not cfg.path:
            raise DataError(f"{DATA_KEY}.source=hub needs {DATA_KEY}.path=<Hub dataset id> (e.g. Anthropic/hh-rlhf).")
        try:
            return datasets.load_dataset(cfg.path, cfg.name, split=split)
        except (ConnectionError, FileNotFoundError, ValueError) as err:
            raise DataError(
                f"Could not load the Hub dataset '{cfg.path}' (split {split}): {type(err).__name__}: {err}. Check "
                f"{DATA_KEY}.path, {DATA_KEY}.name and {DATA_KEY}.split, or use {DATA_KEY}.source=files with local files."
            ) from err
    raise DataError(f"Unknown {DATA_KEY}.source '{cfg.source}'; valid sources are imdb_pairs, files, hub.")


def _read_files(cfg: Any) -> "datasets.Dataset":
    """Every file of ``data.data_files``, read one by one and reduced to the columns a pair uses, so
    files with different extra columns (label metadata) or without the optional ones combine."""
    import datasets

    from rlhf_cli.data.sources import _expand_data_files, read_data_files

    key = f"{DATA_KEY}.data_files"
    wanted = [c for c in (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column, cfg.margin_column, cfg.tie_column) if c]
    csv_options = _csv_options(cfg)
    tables = [read_data_files([path], key=key, csv_options=csv_options) for path in _expand_data_files(list(cfg.data_files), key)]
    if len(tables) == 1:
        return tables[0]
    present = [c for c in dict.fromkeys(c for t in tables for c in t.column_names)]
    columns = [c for c in present if c in wanted] or present  # no pair column at all: keep all, to name them
    rows = [{c: row.get(c) for c in columns} for table in tables for row in table]
    return datasets.Dataset.from_list(rows)


def _csv_options(cfg: Any) -> dict:
    """A pair's text columns read as text; only an empty margin or tie cell is a missing value."""
    from rlhf_cli.data.sources import text_csv_options

    texts = [c for c in (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column) if c]
    return text_csv_options(texts, optional=[c for c in (cfg.margin_column, cfg.tie_column) if c])


def _require_column(table: "datasets.Dataset", column: str, key: str) -> None:
    if column in table.column_names:
        return
    closest = difflib.get_close_matches(column, table.column_names, n=1, cutoff=0.0)
    hint = f" The closest existing column is '{closest[0]}': set {key}={closest[0]}." if closest else ""
    raise DataError(
        f"The preference data has no column '{column}' ({key}); its columns are "
        f"{', '.join(table.column_names) or '(none)'}.{hint}"
    )


def detect_format(table: "datasets.Dataset", cfg: Any) -> str:
    """The format ``cfg.format`` names, or for ``auto`` the one the columns show."""
    _require_column(table, cfg.chosen_column, f"{DATA_KEY}.chosen_column")
    _require_column(table, cfg.rejected_column, f"{DATA_KEY}.rejected_column")
    if cfg.format != "auto":
        if cfg.format == "explicit":
            _require_column(table, cfg.prompt_column, f"{DATA_KEY}.prompt_column")
        return str(cfg.format)
    first = table[0][cfg.chosen_column] if len(table) else ""
    if isinstance(first, list):
        return "conversational"
    return "explicit" if cfg.prompt_column in table.column_names else "implicit"


def parse_rows(table: "datasets.Dataset", cfg: Any, tokenizer: Any, where: str) -> PreferenceRows:
    """Every row of ``table`` as a (prompt, response) pair per side, in ``cfg.format``."""
    fmt = detect_format(table, cfg)
    has_prompt = cfg.prompt_column in table.column_names
    sides: list[tuple[str, str, str, str]] = []
    for number, row in enumerate(table, start=1):
        chosen, rejected = row[cfg.chosen_column], row[cfg.rejected_column]
        prompt = row[cfg.prompt_column] if has_prompt else None
        context = f"row {number} of {where}"
        if fmt == "conversational":
            sides.append(_conversational(prompt, chosen, rejected, tokenizer, context))
        elif fmt == "explicit":
            _check_strings(context, prompt=prompt, chosen=chosen, rejected=rejected)
            sides.append((prompt, chosen, prompt, rejected))
        else:
            _check_strings(context, chosen=chosen, rejected=rejected)
            cut = shared_prompt_length(chosen, rejected)
            sides.append((chosen[:cut], chosen[cut:], rejected[:cut], rejected[cut:]))
    columns = list(zip(*sides)) if sides else [[], [], [], []]
    rows = PreferenceRows(*(list(c) for c in columns))
    rows.margins = _optional_column(table, cfg.margin_column, float, "a number")
    rows.ties = _optional_column(table, cfg.tie_column, bool, "true or false")
    return rows


def _check_strings(context: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, str):
            raise DataError(
                f"The {name} of {context} is {type(value).__name__} ({str(value)[:60]!r}), not text. In the explicit "
                f"and implicit formats prompt, chosen and rejected are strings; lists of {{role, content}} "
                f"messages are the conversational format ({DATA_KEY}.format=conversational)."
            )


def _optional_column(table: "datasets.Dataset", column: Optional[str], kind: type, what: str) -> Optional[list]:
    if not column or column not in table.column_names:
        return None
    values = table[column]
    for number, value in enumerate(values, start=1):
        if value is None:
            continue  # absent in this row (e.g. a file without the column): no margin, not tied
        if (kind is bool and not isinstance(value, bool)) or (kind is float and isinstance(value, (bool, str))):
            raise DataError(f"Column '{column}' of row {number} holds {value!r}; it must be {what} (or null).")
    return [kind(value) if value is not None else kind() for value in values]


def shared_prompt_length(chosen: str, rejected: str) -> int:
    """Characters of the implicit prompt: the longest common prefix of the two texts, cut back to just
    after its last whitespace (so no word is split between prompt and response)."""
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    if length == min(len(chosen), len(rejected)):
        return length
    boundary = max(chosen.rfind(" ", 0, length), chosen.rfind("\n", 0, length))
    return boundary + 1 if boundary >= 0 else 0


# Conversational -----------------------------------------------------------------------------------
def _messages(value: Any, role: str, context: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"The {name} of {context} is neither text nor a list of {{role, content}} messages: {str(value)[:80]!r}.")


def render_chat(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    """``messages`` rendered as text by the tokenizer's chat template (a DataError if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "The data is conversational (lists of {role, content} messages) but the tokenizer has no chat "
            "template to render them. Use an instruct model's tokenizer (e.g. model=smollm2), or give the texts "
            "as strings (explicit or implicit format)."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _conversational(prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, context: str) -> tuple[str, str, str, str]:
    chosen_msgs = _messages(chosen, "assistant", context, "chosen")
    rejected_msgs = _messages(rejected, "assistant", context, "rejected")
    if prompt is None:  # implicit: the shared leading messages are the prompt
        shared = 0
        while shared < min(len(chosen_msgs), len(rejected_msgs)) - 1 and chosen_msgs[shared] == rejected_msgs[shared]:
            shared += 1
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:shared], chosen_msgs[shared:], rejected_msgs[shared:]
    else:
        prompt_msgs = _messages(prompt, "user", context, "prompt")
    prompt_text = render_chat(tokenizer, prompt_msgs, generation_prompt=True) if prompt_msgs else ""
    out = []
    for reply in (chosen_msgs, rejected_msgs):
        full = render_chat(tokenizer, prompt_msgs + reply, generation_prompt=False)
        cut = _common_prefix(prompt_text, full)
        out += [full[:cut], full[cut:]]
    return out[0], out[1], out[2], out[3]


def _common_prefix(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


# Checking -------------------------------------------------------------------------------
def drop_identical(rows: PreferenceRows) -> PreferenceRows:
    """``rows`` without the pairs whose two scored texts are the same (with a notice counting them)."""
    chosen, rejected = rows.chosen_texts, rows.rejected_texts
    keep = [i for i in range(len(rows)) if chosen[i] != rejected[i]]
    if len(keep) == len(rows):
        return rows
    kept = rows.select(keep)
    kept.notices.append(
        f"dropped {len(rows) - len(keep)} of {len(rows)} pairs whose chosen and rejected texts are identical "
        f"(they carry no preference)."
    )
    return kept
