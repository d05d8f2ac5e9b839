"""C4 filters: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", section 2.2, as datatrove implements them in `datatrove/pipeline/filters/c4_filters.py`
(C4QualityFilter, after tensorflow_datasets' c4_utils.py).

C4 edits pages (it removes the lines naming javascript or a policy); this stage only keeps or drops whole documents,
so `boilerplate` drops a page made mostly of such lines instead (a deliberate difference from datatrove).
"""
from __future__ import annotations

import functools
import re

from stages.filters.base import Doc, Verdict, ratio


def lorem_ipsum(doc: Doc, p: dict) -> Verdict:
    """C4: a page where the phrase "lorem ipsum" appears (any case) is removed."""
    if "lorem ipsum" in doc.lower:
        return "lorem_ipsum", "contains 'lorem ipsum'"
    return None


def curly_braces(doc: Doc, p: dict) -> Verdict:
    """C4: a page that contains a curly bracket is removed (marks code or templates on a web page; domains that
    carry code or LaTeX are exempt in params)."""
    if "{" in doc.text:
        return "curly_braces", "contains '{'"
    return None


@functools.lru_cache(maxsize=8)
def _phrase_re(phrases: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(phrase.lower()) for phrase in phrases))


def boilerplate(doc: Doc, p: dict) -> Verdict:
    """C4 removes lines naming javascript, cookies, terms of use, privacy policy; ours: lines naming one of
    `boilerplate_phrases` / lines <= max_boilerplate_lines_frac."""
    pattern = _phrase_re(tuple(p["boilerplate_phrases"]))
    if not pattern.search(doc.lower):
        return None
    frac = ratio(sum(1 for line in doc.lines if pattern.search(line.lower())), len(doc.lines))
    if frac > p["max_boilerplate_lines_frac"]:
        return "boilerplate", f"boilerplate_lines_frac={frac:.3f} > {p['max_boilerplate_lines_frac']}"
    return None


RULES = (lorem_ipsum, curly_braces, boilerplate)
