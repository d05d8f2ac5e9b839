"""Gopher repetition filters: Rae et al. 2021, appendix A.1.1 (MassiveText repetition removal; thresholds in
table A1), as datatrove implements them in `datatrove/pipeline/filters/gopher_repetition_filter.py`
(GopherRepetitionFilter).

Paragraphs are separated by blank lines, lines are the non-empty lines, both stripped. The duplicate fractions
count every paragraph or line equal to an earlier one; their character fractions divide by the document's
characters, as datatrove does. The n-gram fractions are over word characters (whitespace excluded from numerator
and denominator alike, so the layout of spaces cannot move them; datatrove divides n-grams joined by spaces by
all characters).
"""
from __future__ import annotations

import numpy as np

from stages.filters.base import POLY, Doc, Verdict, ratio


def duplicate_paragraphs(doc: Doc, p: dict) -> Verdict:
    """Gopher: paragraphs repeating an earlier paragraph / paragraphs <= max_dup_paragraphs_frac (0.3)."""
    frac = ratio(doc.duplicate_paragraphs[0], len(doc.paragraphs))
    if frac > p["max_dup_paragraphs_frac"]:
        return "duplicate_paragraphs", f"dup_paragraphs_frac={frac:.3f} > {p['max_dup_paragraphs_frac']}"
    return None


def duplicate_paragraph_chars(doc: Doc, p: dict) -> Verdict:
    """Gopher: characters in paragraphs repeating an earlier paragraph / characters
    <= max_dup_paragraph_chars_frac (0.2)."""
    frac = ratio(doc.duplicate_paragraphs[1], len(doc.text))
    if frac > p["max_dup_paragraph_chars_frac"]:
        return "duplicate_paragraph_chars", (f"dup_paragraph_chars_frac={frac:.3f} > "
                                             f"{p['max_dup_paragraph_chars_frac']}")
    return None


def duplicate_lines(doc: Doc, p: dict) -> Verdict:
    """Gopher: lines repeating an earlier line / lines <= max_dup_lines_frac (0.3)."""
    frac = ratio(doc.duplicate_lines[0], len(doc.lines))
    if frac > p["max_dup_lines_frac"]:
        return "duplicate_lines", f"dup_lines_frac={frac:.3f} > {p['max_dup_lines_frac']}"
    return None


def duplicate_line_chars(doc: Doc, p: dict) -> Verdict:
    """Gopher: characters in lines repeating an earlier line / characters <= max_dup_line_chars_frac (0.2)."""
    frac = ratio(doc.duplicate_lines[1], len(doc.text))
    if frac > p["max_dup_line_chars_frac"]:
        return "duplicate_line_chars", f"dup_line_chars_frac={frac:.3f} > {p['max_dup_line_chars_frac']}"
    return None


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """h_i = sum_k ids[i+k] * POLY^(n-1-k) mod 2^64: one value per word n-gram starting at i."""
    h = ids[: len(ids) - n + 1].copy()
    for k in range(1, n):
        h = h * np.uint64(POLY) + ids[k: len(ids) - n + 1 + k]
    return h


def _sorted_runs(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of h and a mask over sorted positions 1.. marking a value equal to its predecessor."""
    order = np.argsort(h, kind="stable")
    sorted_h = h[order]
    return order, sorted_h[1:] == sorted_h[:-1]


def top_ngram(doc: Doc, p: dict) -> Verdict:
    """Gopher: for n in 2..4, count(top n-gram) * chars(top n-gram) / word chars <= max (0.20, 0.18, 0.16), when it
    occurs twice or more (datatrove also scores an n-gram seen once). Ties between equally frequent n-grams go to
    the smallest hash, so the choice is deterministic."""
    ids, prefix = doc.word_ngrams
    for n, limit in p["max_top_ngram_chars_frac"]:
        if len(ids) <= n:
            continue
        order, repeat = _sorted_runs(_ngram_hashes(ids, n))
        if not repeat.any():
            continue
        run_start = np.flatnonzero(np.concatenate(([True], ~repeat)))
        run_length = np.diff(np.append(run_start, len(order)))
        top = int(np.argmax(run_length))
        start = int(order[run_start[top]])
        frac = ratio(int(run_length[top]) * int(prefix[start + n] - prefix[start]), doc.word_chars)
        if frac > limit:
            return "top_ngram", f"top_{n}gram_chars_frac={frac:.3f} > {limit}"
    return None


def duplicate_ngram(doc: Doc, p: dict) -> Verdict:
    """Gopher: for n in 5..10, chars of words covered by repeated n-grams (every occurrence after the first,
    overlaps counted once, as the paper defines it; datatrove scans greedily and skips n words after a repeat)
    / word chars <= max (0.15 .. 0.10). Coverage only shrinks as n grows, so a small 5-gram coverage settles every
    larger n at once."""
    ids, prefix = doc.word_ngrams
    lengths = np.diff(prefix)
    limits = sorted(p["max_dup_ngram_chars_frac"])
    floor = min(limit for _, limit in limits)
    for n, limit in limits:
        if len(ids) <= n:
            return None
        order, repeat = _sorted_runs(_ngram_hashes(ids, n))
        starts = order[1:][repeat]
        if len(starts) == 0:
            return None
        depth = np.cumsum(np.bincount(starts, minlength=len(ids) + 1) - np.bincount(starts + n, minlength=len(ids) + 1))
        frac = ratio(int(lengths[depth[: len(ids)] > 0].sum()), doc.word_chars)
        if frac > limit:
            return "duplicate_ngram", f"dup_{n}gram_chars_frac={frac:.3f} > {limit}"
        if frac <= floor:
            return None
    return None


RULES = (duplicate_paragraphs, duplicate_paragraph_chars, duplicate_lines, duplicate_line_chars, top_ngram,
         duplicate_ngram)
