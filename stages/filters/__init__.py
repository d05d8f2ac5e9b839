"""Data filters: one module per rule family, the way datatrove keeps one filter per file.

  garbage            binary_garbage (ours)
  gopher_quality     Gopher quality: word_count .. stop_words          (Rae et al. 2021, table A1)
  gopher_repetition  Gopher repetition: duplicate paragraphs, lines, n-grams
  c4                 C4: lorem_ipsum, curly_braces, boilerplate        (Raffel et al. 2020)
  fineweb            FineWeb: line_punctuation, short_lines            (Penedo et al. 2024)
  langid             language id (langid.py, vectorized), run last over the survivors
  minhash            exact hashes and MinHash/LSH signatures for dedup

Here: the registry of rules by name and the rule plan that turns `filter` params into what each domain runs.
stages/filter.py is the stage driver (CLI, shards, outputs).
"""
from __future__ import annotations

from stages import common
from stages.filters import c4, fineweb, garbage, gopher_quality, gopher_repetition
from stages.filters.base import Doc, Verdict
from stages.filters.langid import LANGUAGE_RULE

RULES = {f.__name__: f for family in (garbage, gopher_quality, c4, fineweb, gopher_repetition) for f in family.RULES}


class RulePlan:
    """What each domain runs: the rules in the order of `filter.rules`, minus `filter.rules_exempt_by_domain[domain]`,
    with the thresholds of `filter.thresholds_by_domain[domain]` over the defaults; language id last unless exempt.
    Unknown rule names or threshold keys are a params error."""

    def __init__(self, p: dict):
        known = set(RULES) | {LANGUAGE_RULE}
        self.exempt = {d: set(rules) for d, rules in (p.get("rules_exempt_by_domain") or {}).items()}
        unknown = {r for r in p["rules"] if r not in RULES}
        unknown |= {r for rules in self.exempt.values() for r in rules if r not in known}
        if unknown:
            raise common.StageError(f"params filter: unknown rules {sorted(unknown)} (known: {sorted(known)})")
        self.thresholds = p.get("thresholds_by_domain") or {}
        for domain, overrides in self.thresholds.items():
            if set(overrides) - set(p):
                raise common.StageError(f"params filter.thresholds_by_domain.{domain}: unknown keys "
                                        f"{sorted(set(overrides) - set(p))}")
        self.p = p
        self.order = list(p["rules"])
        self.language = bool(p["languages"])
        self._by_domain: dict[str, tuple[tuple, bool, dict]] = {}

    def names(self) -> list[str]:
        return self.order + ([LANGUAGE_RULE] if self.language else [])

    def for_domain(self, domain: str) -> tuple[tuple, bool, dict]:
        """(rule functions in order, whether language id runs, the params the rules read) for one domain."""
        if domain not in self._by_domain:
            exempt = self.exempt.get(domain, set())
            self._by_domain[domain] = (tuple(RULES[r] for r in self.order if r not in exempt),
                                       self.language and LANGUAGE_RULE not in exempt,
                                       {**self.p, **self.thresholds.get(domain, {})})
        return self._by_domain[domain]


def first_failing_rule(doc: Doc, rules: tuple, p: dict) -> Verdict:
    for rule in rules:
        verdict = rule(doc, p)
        if verdict is not None:
            return verdict
    return None
