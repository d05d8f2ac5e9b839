"""Character-level garbage: ours, no published counterpart (datatrove has no such step).

Text decoded from binary, or with its encoding lost, is full of U+FFFD and C0/C1 control characters; a small
fraction of them marks the document as unusable before any word-level rule looks at it.
"""
from __future__ import annotations

import re

from stages.filters.base import Doc, Verdict, ratio

GARBAGE_RE = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def binary_garbage(doc: Doc, p: dict) -> Verdict:
    """(U+FFFD + control characters other than tab, newline, carriage return) / characters
    <= max_garbage_chars_frac."""
    if not GARBAGE_RE.search(doc.text):
        return None
    frac = ratio(len(GARBAGE_RE.findall(doc.text)), len(doc.text))
    if frac > p["max_garbage_chars_frac"]:
        return "binary_garbage", f"garbage_chars_frac={frac:.4f} > {p['max_garbage_chars_frac']}"
    return None


RULES = (binary_garbage,)
