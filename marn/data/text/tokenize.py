"""Title words: NFKC, lowercase, runs of letters, digits and combining marks (see :mod:`marn.data.text`)."""

from __future__ import annotations

import contextlib
import functools
import gc
import unicodedata
from collections.abc import Iterable, Iterator

import regex

_APOSTROPHES = "'\u2019\u02bc"  # ' (straight), ’ (right single quote, which NFKC keeps), ʼ (modifier)


@functools.cache
def _patterns() -> tuple[regex.Pattern[str], bytes]:
    """(word pattern for any text, byte table for ASCII text), built on first use rather than at import.

    Letters, numbers and marks: Python's ``\\w`` excludes combining marks (categories Mn/Mc/Me), which would
    cut words of scripts such as Devanagari apart at every vowel sign. On every code point Python's
    unicodedata assigns, the class is exactly ``str.isalnum()`` plus the marks (tests/unit/test_text.py).
    """
    # Underscores are turned into spaces before matching, so they need no place in the class.
    word = regex.compile(r"[\p{L}\p{N}\p{M}]+")
    # ASCII: A-Z -> a-z, a-z and 0-9 kept, every other byte -> space (the same tokens as the pattern).
    ascii_table = bytes(
        c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122) else 32 for c in range(256)
    )
    return word, ascii_table


def tokenize(title: object) -> list[str]:
    """Words of one title: NFKC, lowercase, runs of letters/digits (see the module docstring).

    Anything that is not a ``str`` (None, NaN, pd.NA) has no words.

    >>> tokenize("Girls' Ballet Tutu (Hot-Pink)")
    ['girls', 'ballet', 'tutu', 'hot', 'pink']
    """
    if not isinstance(title, str):
        return []
    if title.isascii():
        _, ascii_table = _patterns()
        # Fast path (most titles): NFKC is the identity on ASCII, and bytes.translate + split run at
        # memory speed where a regex scan is ~10x slower. Deleting "'" joins "men's" -> "mens".
        return title.encode("ascii").translate(ascii_table, b"'").decode("ascii").split()
    return _tokenize_unicode(title)


def _tokenize_unicode(title: str) -> list[str]:
    """The general path; on ASCII input it yields exactly what the fast path of :func:`tokenize` yields."""
    word, _ = _patterns()
    # NFKC before lower(): compatibility forms (ﬁ, full-width letters) may fold to uppercase letters.
    text = unicodedata.normalize("NFKC", title).lower()
    for apostrophe in _APOSTROPHES:
        if apostrophe in text:
            text = text.replace(apostrophe, "")
    if "_" in text:
        text = text.replace("_", " ")
    # Whitespace-separated chunks that are all letters/digits (str.isalnum is what \w means) are words
    # as they stand; only the others go through the regex, whose big character class is slow per char.
    tokens: list[str] = []
    for chunk in text.split():
        if chunk.isalnum():
            tokens.append(chunk)
        else:
            tokens.extend(word.findall(chunk))
    return tokens


def tokenize_titles(titles: Iterable[object]) -> list[list[str]]:
    """:func:`tokenize` over many titles (a list, pandas Series or pyarrow array)."""
    with _gc_paused():
        return [tokenize(t) for t in iter_titles(titles)]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small lists that all stay alive.

    Each new list counts towards a collection and the collections rescan every list built so far:
    for 1e5 titles that doubled the time. Token lists hold only strings, so no cycles are missed.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def iter_titles(titles: Iterable[object]) -> Iterable[object]:
    # pyarrow arrays iterate as pyarrow scalars; convert them once to Python strings / None.
    to_pylist = getattr(titles, "to_pylist", None)
    return to_pylist() if callable(to_pylist) else titles
