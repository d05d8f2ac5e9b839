"""What every rule family shares: the document view, the verdict type and the ratio helper.

A rule is a small named function `rule(doc, p) -> Verdict`: None keeps the document, (rule, detail) drops it.
Features several rules read (words, lines, paragraphs, duplicate counts) are computed once per document, on demand.
"""
from __future__ import annotations

import functools
import re
import string
import unicodedata

import numpy as np

# Odd multiplier for 64-bit polynomial hashing (odd => invertible mod 2^64, so span hashes can be shifted).
POLY = 0x100000001B3
# A rule's answer: None keeps the document, (rule, detail) drops it.
Verdict = tuple[str, str] | None

# Punctuation as datatrove's PUNCTUATION_SET means it: ASCII punctuation plus every Unicode P* character
# (all of them lie below U+20000). A word made only of these ("-", "...", "|") is a symbol word.
PUNCTUATION = frozenset(string.punctuation) | frozenset(
    c for c in map(chr, range(0x20000)) if unicodedata.category(c).startswith("P"))
PARAGRAPH_BREAK_RE = re.compile(r"\n\s*\n")


def ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters): datatrove's find_duplicates."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


class Doc:
    """One document with the features the rules share, each computed once and only when a rule asks."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        """Whitespace words (str.split)."""
        return self.text.split()

    @functools.cached_property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped."""
        return [s for s in map(str.strip, self.text.split("\n")) if s]

    @functools.cached_property
    def paragraphs(self) -> list[str]:
        """Non-empty paragraphs (separated by blank lines), stripped."""
        return [s for s in map(str.strip, PARAGRAPH_BREAK_RE.split(self.text)) if s]

    @functools.cached_property
    def lower(self) -> str:
        return self.text.lower()

    @functools.cached_property
    def word_chars(self) -> int:
        return sum(map(len, self.words))

    @functools.cached_property
    def symbol_words(self) -> tuple[int, int]:
        """(words made only of punctuation, their characters); str.isalnum() settles most words in C."""
        found = [w for w in self.words if not w.isalnum() and PUNCTUATION.issuperset(w)]
        return len(found), sum(map(len, found))

    @functools.cached_property
    def word_ngrams(self) -> tuple[np.ndarray, np.ndarray]:
        """(word ids, prefix sums of word lengths) for the repetition rules."""
        first_seen: dict[str, int] = {}
        # A word's id is the position of its first occurrence: equal words, equal ids, in one C-level pass.
        ids = np.array(list(map(first_seen.setdefault, self.words, range(len(self.words)))), np.uint64)
        lengths = np.fromiter(map(len, self.words), np.int64, len(self.words))
        return ids, np.concatenate(([0], np.cumsum(lengths)))

    @functools.cached_property
    def duplicate_lines(self) -> tuple[int, int]:
        """(lines equal to an earlier line, their characters)."""
        return _duplicates(self.lines)

    @functools.cached_property
    def duplicate_paragraphs(self) -> tuple[int, int]:
        """(paragraphs equal to an earlier paragraph, their characters)."""
        return _duplicates(self.paragraphs)
