"""Gopher quality filters: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", appendix A.1.1 (MassiveText quality filters; thresholds in table A1), as datatrove implements them in
`datatrove/pipeline/filters/gopher_quality_filter.py` (GopherQualityFilter).

Words are whitespace words (str.split): datatrove's stock English tokenizer (spaCy) also counts punctuation as
words, which would move every threshold below. A symbol word is one made only of punctuation (datatrove's
PUNCTUATION_SET: ASCII punctuation and Unicode P*); the word count and the mean word length skip them, the
symbol-to-word ratios and the alphabetic-word fraction count all words, as datatrove does.
Lines are the non-empty lines, stripped (datatrove's `text.splitlines()` also counts blank lines in the denominator,
so its bullet and ellipsis fractions depend on how paragraphs are separated).
"""
from __future__ import annotations

from stages.filters.base import Doc, Verdict, ratio

ELLIPSES = ("...", "\u2026")


def word_count(doc: Doc, p: dict) -> Verdict:
    """Gopher: min_words <= number of non-symbol words <= max_words (50 and 100,000 in table A1)."""
    n = len(doc.words) - doc.symbol_words[0]
    if n < p["min_words"] or n > p["max_words"]:
        return "word_count", f"words={n} not in [{p['min_words']}, {p['max_words']}]"
    return None


def mean_word_length(doc: Doc, p: dict) -> Verdict:
    """Gopher: min_mean_word_length <= mean characters per non-symbol word <= max_mean_word_length (3 and 10)."""
    n_symbol, symbol_chars = doc.symbol_words
    mean = ratio(doc.word_chars - symbol_chars, len(doc.words) - n_symbol)
    if mean < p["min_mean_word_length"] or mean > p["max_mean_word_length"]:
        return "mean_word_length", (f"mean_word_length={mean:.2f} not in "
                                    f"[{p['min_mean_word_length']}, {p['max_mean_word_length']}]")
    return None


def hash_ratio(doc: Doc, p: dict) -> Verdict:
    """Gopher: hash symbols / words <= max_hash_word_ratio (0.1; the hash and the ellipsis are separate ratios)."""
    value = ratio(doc.text.count("#"), len(doc.words))
    if value > p["max_hash_word_ratio"]:
        return "hash_ratio", f"hash_word_ratio={value:.3f} > {p['max_hash_word_ratio']}"
    return None


def ellipsis_ratio(doc: Doc, p: dict) -> Verdict:
    """Gopher: ellipses ("..." or U+2026) / words <= max_ellipsis_word_ratio (0.1)."""
    value = ratio(sum(map(doc.text.count, ELLIPSES)), len(doc.words))
    if value > p["max_ellipsis_word_ratio"]:
        return "ellipsis_ratio", f"ellipsis_word_ratio={value:.3f} > {p['max_ellipsis_word_ratio']}"
    return None


def bullet_lines(doc: Doc, p: dict) -> Verdict:
    """Gopher: lines starting with a bullet / lines <= max_bullet_lines_frac (0.9). Bullets are `bullets`
    (datatrove: only U+2022 and "-")."""
    bullets = tuple(p["bullets"])
    frac = ratio(sum(1 for line in doc.lines if line.startswith(bullets)), len(doc.lines))
    if frac > p["max_bullet_lines_frac"]:
        return "bullet_lines", f"bullet_lines_frac={frac:.3f} > {p['max_bullet_lines_frac']}"
    return None


def ellipsis_lines(doc: Doc, p: dict) -> Verdict:
    """Gopher: lines ending with an ellipsis / lines <= max_ellipsis_lines_frac (0.3)."""
    frac = ratio(sum(1 for line in doc.lines if line.endswith(ELLIPSES)), len(doc.lines))
    if frac > p["max_ellipsis_lines_frac"]:
        return "ellipsis_lines", f"ellipsis_lines_frac={frac:.3f} > {p['max_ellipsis_lines_frac']}"
    return None


def alpha_words(doc: Doc, p: dict) -> Verdict:
    """Gopher: words holding at least one alphabetic character (str.isalpha) / words >= min_alpha_words_frac (0.8)."""
    alpha = sum(1 for w in doc.words if w.isalpha() or any(map(str.isalpha, w)))
    frac = ratio(alpha, len(doc.words))
    if frac < p["min_alpha_words_frac"]:
        return "alpha_words", f"alpha_words_frac={frac:.3f} < {p['min_alpha_words_frac']}"
    return None


def stop_words(doc: Doc, p: dict) -> Verdict:
    """Gopher: at least min_stop_words (2) of the stop words (the, be, to, of, and, that, have, with) occur as
    words, each matched exactly (case and attached punctuation count) and counted once, as datatrove does."""
    found = len(set(p["stop_words"]).intersection(doc.words))
    if found < p["min_stop_words"]:
        return "stop_words", f"stop_words={found} < {p['min_stop_words']}"
    return None


RULES = (word_count, mean_word_length, hash_ratio, ellipsis_ratio, bullet_lines, ellipsis_lines, alpha_words,
         stop_words)
