"""FineWeb quality filters: Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for the Finest Text Data at
Scale", section 3.5 (custom filters), as datatrove implements them in
`datatrove/pipeline/filters/fineweb_quality_filter.py` (FineWebQualityFilter).

The comparisons are datatrove's: a document is removed when the fraction of lines ending in terminal punctuation
is strictly below its threshold (0.12), or when the fraction of lines of at most `short_line_chars` (30) characters
is strictly above its threshold (0.67). Lines are the non-empty lines, stripped (datatrove tests the line as written,
so trailing spaces hide its punctuation and count towards its length). FineWeb's duplicated-line-character
(0.01) and newline-per-word (0.3) ratios are not rules here.
"""
from __future__ import annotations

from stages.filters.base import Doc, Verdict, ratio


def line_punctuation(doc: Doc, p: dict) -> Verdict:
    """FineWeb: lines ending with one of `terminal_punctuation` / lines >= min_line_punctuation_frac."""
    ends = tuple(p["terminal_punctuation"])
    frac = ratio(sum(1 for line in doc.lines if line.endswith(ends)), len(doc.lines))
    if frac < p["min_line_punctuation_frac"]:
        return "line_punctuation", f"line_punctuation_frac={frac:.3f} < {p['min_line_punctuation_frac']}"
    return None


def short_lines(doc: Doc, p: dict) -> Verdict:
    """FineWeb: lines of at most short_line_chars characters / lines <= max_short_lines_frac."""
    limit = p["short_line_chars"]
    frac = ratio(sum(1 for line in doc.lines if len(line) <= limit), len(doc.lines))
    if frac > p["max_short_lines_frac"]:
        return "short_lines", f"short_lines_frac={frac:.3f} > {p['max_short_lines_frac']}"
    return None


RULES = (line_punctuation, short_lines)
