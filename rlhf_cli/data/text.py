"""Text cleaning shared by the prompt datasets and the review tokenizer."""

from __future__ import annotations

import re
from typing import Optional, Sequence

# IMDb reviews mark line breaks with "<br />" (sometimes "<br>" or "<BR/>"); they carry no words.
_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_html(text: Optional[str]) -> str:
    """Replace ``<br />`` tags with a space and collapse runs of whitespace (``None`` becomes ``""``)."""
    if text is None:
        return ""
    if "<" in text:  # the regex only runs on texts that can hold a tag
        text = _BREAK_TAG.sub(" ", text)
    # str.split() splits on any Unicode whitespace and drops the ends: 4x faster than re.sub(r"\s+").
    return " ".join(text.split())


def clean_html_batch(texts: Sequence[Optional[str]]) -> list[str]:
    """:func:`clean_html` over a batch of texts."""
    return [clean_html(text) for text in texts]
