"""Hybrid filtering, part 1: heuristic quality rules, language id, and MinHash signatures for dedup.

Per shard: ingest/<shard>.parquet -> filter/kept/<shard>.parquet, filter/rejected/<shard>.parquet (+ rule, detail),
filter/sigs/<shard>.parquet (one row per kept document) and filter/<shard>.manifest.json, written last.

Rules are small named functions `rule(doc, p) -> None | (rule, detail)`, applied in the order of `filter.rules`;
the first that fires is the recorded reason. They follow Gopher (MassiveText quality and repetition filters), C4
and FineWeb; `filter.rules_exempt_by_domain` lists the rules a domain skips (code keeps its braces and symbols) and
`filter.thresholds_by_domain` loosens thresholds for a domain (worked math is short and half numbers).
Language id (langid.py, batched) runs last, only over documents that survived the cheap rules.

Signatures: exact_hash = xxh3-128 of the normalized text (lowercased, punctuation stripped, whitespace collapsed);
MinHash over the word n-gram shingles of that normalized text, h_k(S) = min_{s in S} (a_k * x(s) + b_k) mod p with
p = 2^31 - 1, and LSH band hashes, one per band of `rows` consecutive minima.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from stages import common

STAGE = "filter"
REQUIRED_COLUMNS = ("id", "domain", "text", "approx_tokens")
LANGUAGE_RULE = "language"

MERSENNE_31 = np.uint64((1 << 31) - 1)
# Odd multipliers for 64-bit polynomial hashing (odd => invertible mod 2^64, so span hashes can be shifted).
POLY = 0x100000001B3
POLY_INV = pow(POLY, -1, 1 << 64)
BAND_POLY = np.uint64(0x9E3779B97F4A7C15)
# Texts per langid matmul and bytes per shingling pass: bound the temporary arrays, not the shard.
LANGID_BATCH = 256
SHINGLE_CHUNK_BYTES = 1 << 20
MINHASH_SLAB_ROWS = 8192

GARBAGE_RE = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
LETTER_RE = re.compile(r"[^\W\d_]")
PUNCTUATION_RE = re.compile(r"[^\w\s]")

# A rule's answer: None keeps the document, (rule, detail) drops it.
Verdict = tuple[str, str] | None


# ----------------------------------------------------------------------------- document view

class Doc:
    """One document with the features the rules share, each computed once and only when a rule asks."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @functools.cached_property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped."""
        return [s for s in map(str.strip, self.text.split("\n")) if s]

    @functools.cached_property
    def lower(self) -> str:
        return self.text.lower()

    @functools.cached_property
    def word_chars(self) -> int:
        return sum(map(len, self.words))

    @functools.cached_property
    def word_ngrams(self) -> tuple[np.ndarray, np.ndarray]:
        """(word ids, prefix sums of word lengths) for the repetition rules."""
        first_seen: dict[str, int] = {}
        # A word's id is the position of its first occurrence: equal words, equal ids, in one C-level pass.
        ids = np.array(list(map(first_seen.setdefault, self.words, range(len(self.words)))), np.uint64)
        lengths = np.fromiter(map(len, self.words), np.int64, len(self.words))
        return ids, np.concatenate(([0], np.cumsum(lengths)))

    @functools.cached_property
    def duplicate_lines(self) -> tuple[int, int, int]:
        """(lines that repeat an earlier line, their characters, all line characters)."""
        seen: set[str] = set()
        dup_lines = dup_chars = total = 0
        for line in self.lines:
            total += len(line)
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            else:
                seen.add(line)
        return dup_lines, dup_chars, total


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """h_i = sum_k ids[i+k] * POLY^(n-1-k) mod 2^64: one value per word n-gram starting at i."""
    h = ids[: len(ids) - n + 1].copy()
    for k in range(1, n):
        h = h * np.uint64(POLY) + ids[k: len(ids) - n + 1 + k]
    return h


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


# ----------------------------------------------------------------------------- rules (first that fires wins)

def binary_garbage(doc: Doc, p: dict) -> Verdict:
    """Character-level garbage: (U+FFFD + control characters) / characters > max_garbage_chars_frac."""
    if not GARBAGE_RE.search(doc.text):
        return None
    frac = _ratio(len(GARBAGE_RE.findall(doc.text)), len(doc.text))
    if frac > p["max_garbage_chars_frac"]:
        return "binary_garbage", f"garbage_chars_frac={frac:.4f} > {p['max_garbage_chars_frac']}"
    return None


def word_count(doc: Doc, p: dict) -> Verdict:
    """Gopher: min_words <= #words <= max_words (whitespace words)."""
    n = len(doc.words)
    if n < p["min_words"] or n > p["max_words"]:
        return "word_count", f"words={n} not in [{p['min_words']}, {p['max_words']}]"
    return None


def mean_word_length(doc: Doc, p: dict) -> Verdict:
    """Gopher: min_mean_word_length <= (non-space characters / words) <= max_mean_word_length."""
    mean = _ratio(doc.word_chars, len(doc.words))
    if mean < p["min_mean_word_length"] or mean > p["max_mean_word_length"]:
        return "mean_word_length", (f"mean_word_length={mean:.2f} not in "
                                    f"[{p['min_mean_word_length']}, {p['max_mean_word_length']}]")
    return None


def symbol_ratio(doc: Doc, p: dict) -> Verdict:
    """Gopher: (#hash symbols + #ellipses) / words <= max_symbol_word_ratio."""
    symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("\u2026")
    ratio = _ratio(symbols, len(doc.words))
    if ratio > p["max_symbol_word_ratio"]:
        return "symbol_ratio", f"symbol_word_ratio={ratio:.3f} > {p['max_symbol_word_ratio']}"
    return None


def bullet_lines(doc: Doc, p: dict) -> Verdict:
    """Gopher: fraction of lines starting with a bullet <= max_bullet_lines_frac."""
    bullets = tuple(p["bullets"])
    frac = _ratio(sum(1 for line in doc.lines if line.startswith(bullets)), len(doc.lines))
    if frac > p["max_bullet_lines_frac"]:
        return "bullet_lines", f"bullet_lines_frac={frac:.3f} > {p['max_bullet_lines_frac']}"
    return None


def ellipsis_lines(doc: Doc, p: dict) -> Verdict:
    """Gopher: fraction of lines ending with an ellipsis <= max_ellipsis_lines_frac."""
    frac = _ratio(sum(1 for line in doc.lines if line.endswith(("...", "\u2026"))), len(doc.lines))
    if frac > p["max_ellipsis_lines_frac"]:
        return "ellipsis_lines", f"ellipsis_lines_frac={frac:.3f} > {p['max_ellipsis_lines_frac']}"
    return None


def alpha_words(doc: Doc, p: dict) -> Verdict:
    """Gopher: fraction of words holding at least one letter >= min_alpha_words_frac."""
    no_letter = sum(1 for w in doc.words if not w.isalpha() and not LETTER_RE.search(w))
    frac = _ratio(len(doc.words) - no_letter, len(doc.words))
    if frac < p["min_alpha_words_frac"]:
        return "alpha_words", f"alpha_words_frac={frac:.3f} < {p['min_alpha_words_frac']}"
    return None


@functools.lru_cache(maxsize=8)
def _word_set_re(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)


def stop_words(doc: Doc, p: dict) -> Verdict:
    """Gopher: at least min_stop_words occurrences of the stop words (the, be, to, of, and, that, have, with)."""
    need = p["min_stop_words"]
    found = 0
    for _ in _word_set_re(tuple(p["stop_words"])).finditer(doc.text):
        found += 1
        if found >= need:
            return None
    return "stop_words", f"stop_words={found} < {need}"


def lorem_ipsum(doc: Doc, p: dict) -> Verdict:
    """C4: placeholder text anywhere drops the page."""
    if "lorem ipsum" in doc.lower:
        return "lorem_ipsum", "contains 'lorem ipsum'"
    return None


def curly_braces(doc: Doc, p: dict) -> Verdict:
    """C4: a curly brace marks code or templates on a web page (domains that carry code or LaTeX are exempt)."""
    if "{" in doc.text:
        return "curly_braces", "contains '{'"
    return None


def boilerplate(doc: Doc, p: dict) -> Verdict:
    """C4: fraction of lines naming javascript, cookies, terms of use, ... <= max_boilerplate_lines_frac."""
    pattern = _phrase_re(tuple(p["boilerplate_phrases"]))
    if not pattern.search(doc.lower):
        return None
    frac = _ratio(sum(1 for line in doc.lines if pattern.search(line.lower())), len(doc.lines))
    if frac > p["max_boilerplate_lines_frac"]:
        return "boilerplate", f"boilerplate_lines_frac={frac:.3f} > {p['max_boilerplate_lines_frac']}"
    return None


@functools.lru_cache(maxsize=8)
def _phrase_re(phrases: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(phrase.lower()) for phrase in phrases))


def line_punctuation(doc: Doc, p: dict) -> Verdict:
    """FineWeb: fraction of lines ending with terminal punctuation >= min_line_punctuation_frac."""
    ends = tuple(p["terminal_punctuation"])
    frac = _ratio(sum(1 for line in doc.lines if line.endswith(ends)), len(doc.lines))
    if frac < p["min_line_punctuation_frac"]:
        return "line_punctuation", f"line_punctuation_frac={frac:.3f} < {p['min_line_punctuation_frac']}"
    return None


def short_lines(doc: Doc, p: dict) -> Verdict:
    """FineWeb: fraction of lines of at most short_line_chars characters <= max_short_lines_frac."""
    limit = p["short_line_chars"]
    frac = _ratio(sum(1 for line in doc.lines if len(line) <= limit), len(doc.lines))
    if frac > p["max_short_lines_frac"]:
        return "short_lines", f"short_lines_frac={frac:.3f} > {p['max_short_lines_frac']}"
    return None


def duplicate_lines(doc: Doc, p: dict) -> Verdict:
    """Gopher: lines repeating an earlier line / lines <= max_dup_lines_frac."""
    frac = _ratio(doc.duplicate_lines[0], len(doc.lines))
    if frac > p["max_dup_lines_frac"]:
        return "duplicate_lines", f"dup_lines_frac={frac:.3f} > {p['max_dup_lines_frac']}"
    return None


def duplicate_line_chars(doc: Doc, p: dict) -> Verdict:
    """Gopher: characters in lines repeating an earlier line / line characters <= max_dup_line_chars_frac."""
    _, dup_chars, total = doc.duplicate_lines
    frac = _ratio(dup_chars, total)
    if frac > p["max_dup_line_chars_frac"]:
        return "duplicate_line_chars", f"dup_line_chars_frac={frac:.3f} > {p['max_dup_line_chars_frac']}"
    return None


def _sorted_runs(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of h and a mask over sorted positions 1.. marking a value equal to its predecessor."""
    order = np.argsort(h, kind="stable")
    sorted_h = h[order]
    return order, sorted_h[1:] == sorted_h[:-1]


def top_ngram(doc: Doc, p: dict) -> Verdict:
    """Gopher: for n in 2..4, count(top n-gram) * chars(top n-gram) / word chars <= max, when it occurs twice or more.
    Ties between equally frequent n-grams go to the smallest hash, so the choice is deterministic."""
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
        frac = _ratio(int(run_length[top]) * int(prefix[start + n] - prefix[start]), doc.word_chars)
        if frac > limit:
            return "top_ngram", f"top_{n}gram_chars_frac={frac:.3f} > {limit}"
    return None


def duplicate_ngram(doc: Doc, p: dict) -> Verdict:
    """Gopher: for n in 5..10, chars of words covered by repeated n-grams (every occurrence after the first,
    overlaps counted once) / word chars <= max. Coverage only shrinks as n grows, so a small 5-gram coverage
    settles every larger n at once."""
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
        frac = _ratio(int(lengths[depth[: len(ids)] > 0].sum()), doc.word_chars)
        if frac > limit:
            return "duplicate_ngram", f"dup_{n}gram_chars_frac={frac:.3f} > {limit}"
        if frac <= floor:
            return None
    return None


RULES = {f.__name__: f for f in (
    binary_garbage, word_count, mean_word_length, symbol_ratio, bullet_lines, ellipsis_lines, alpha_words,
    stop_words, lorem_ipsum, curly_braces, boilerplate, line_punctuation, short_lines, duplicate_lines,
    duplicate_line_chars, top_ngram, duplicate_ngram)}


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
            raise common.StageError(f"params {STAGE}: unknown rules {sorted(unknown)} (known: {sorted(known)})")
        self.thresholds = p.get("thresholds_by_domain") or {}
        for domain, overrides in self.thresholds.items():
            if set(overrides) - set(p):
                raise common.StageError(f"params {STAGE}.thresholds_by_domain.{domain}: unknown keys "
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


# ----------------------------------------------------------------------------- language id

def _automaton_strings(nextmove: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(length, big-endian byte value) of the string each Aho-Corasick state stands for.

    A state's string is the shortest input that reaches it, found level by level from state 0."""
    depth = np.full(len(nextmove), -1, np.int64)
    value = np.zeros(len(nextmove), np.int64)
    depth[0] = 0
    frontier = np.zeros(1, np.int64)
    level = 0
    while len(frontier):
        level += 1
        child = nextmove[frontier].ravel()
        child_value = ((value[frontier][:, None] << 8) | np.arange(256)).ravel()
        new = depth[child] == -1
        reached, first = np.unique(child[new], return_index=True)
        depth[reached] = level
        value[reached] = child_value[new][first]
        frontier = reached
    return depth, value


@functools.lru_cache(maxsize=1)
def langid_identifier():
    """langid.py's own identifier over the model that ships inside the package (offline), normalized probabilities."""
    from langid import langid
    return langid.LanguageIdentifier.from_modelstring(langid.model, norm_probs=True)


class LangidModel:
    """langid.py's naive Bayes language identifier with its feature extraction vectorized.

    langid counts n_t(d), the occurrences of each of its byte n-gram features t (1..4 bytes) in the UTF-8
    text, by running an Aho-Corasick automaton one Python step per byte. The automaton's states are exactly
    the prefixes of the features, so the same counts come from looking every 1..4-byte window up in tables
    of the features (direct tables for 1..3 bytes, a sorted array for 4 bytes). Then
    log P(c | d) = sum_t n_t(d) log P(t | c) + log P(c), softmax over the classes c."""

    MAX_FEATURE_BYTES = 4

    def __init__(self):
        ident = langid_identifier()
        self.log_p_t_given_c = ident.nb_ptc
        self.log_p_c = ident.nb_pc
        self.classes = [str(c) for c in ident.nb_classes]
        self.n_features = ident.nb_numfeats
        depth, value = _automaton_strings(np.asarray(ident.tk_nextmove, np.int64).reshape(-1, 256))
        feature_len = np.full(self.n_features, self.MAX_FEATURE_BYTES + 1, np.int64)
        feature_value = np.zeros(self.n_features, np.int64)
        for state, features in ident.tk_output.items():
            for f in features:
                # A state outputs every feature that is a suffix of its string; the feature's own state is the shortest.
                if depth[state] < feature_len[f]:
                    feature_len[f], feature_value[f] = depth[state], value[state]
        if (feature_len > self.MAX_FEATURE_BYTES).any() or self.n_features > np.iinfo(np.int16).max:
            raise common.StageError(f"langid model: only up to {np.iinfo(np.int16).max} features of at most "
                                    f"{self.MAX_FEATURE_BYTES} bytes are supported")
        self.tables = []
        for n in range(1, self.MAX_FEATURE_BYTES):
            table = np.full(1 << (8 * n), -1, np.int16)
            table[feature_value[feature_len == n]] = np.flatnonzero(feature_len == n)
            self.tables.append(table)
        longest = np.flatnonzero(feature_len == self.MAX_FEATURE_BYTES)
        order = np.argsort(feature_value[longest])
        self.longest_values = feature_value[longest][order]
        self.longest_index = longest[order]
        self.longest_prefix = np.zeros(1 << 24, bool)
        self.longest_prefix[self.longest_values >> 8] = True

    def feature_counts(self, texts: list[str]):
        """n_t(d) for every text d as a sparse (len(texts), n_features) matrix: langid's instance2fv, batched."""
        from scipy import sparse
        encoded = [t.encode("utf-8") for t in texts]
        b = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int64)
        doc = np.repeat(np.arange(len(encoded)), [len(e) for e in encoded])
        keys = []
        window = b
        for n in range(1, self.MAX_FEATURE_BYTES + 1):
            if len(b) < n:
                break
            if n > 1:
                window = (window[: len(b) - n + 1] << 8) | b[n - 1:]
            if n < self.MAX_FEATURE_BYTES:
                feature = self.tables[n - 1][window]
                pos = np.flatnonzero(feature >= 0)
                feature = feature[pos].astype(np.int64)
            else:
                pos = np.flatnonzero(self.longest_prefix[window >> 8])
                at = np.minimum(np.searchsorted(self.longest_values, window[pos]), len(self.longest_values) - 1)
                hit = self.longest_values[at] == window[pos]
                pos, feature = pos[hit], self.longest_index[at[hit]]
            within = doc[pos] == doc[pos + n - 1]  # windows never span two texts
            keys.append(doc[pos[within]] * self.n_features + feature[within])
        cells, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
        return sparse.csr_matrix((counts.astype(np.float64), (cells // self.n_features, cells % self.n_features)),
                                 shape=(len(texts), self.n_features))

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(most probable language, its normalized probability) per text."""
        out: list[tuple[str, float]] = []
        for lo in range(0, len(texts), LANGID_BATCH):
            logp = np.asarray(self.feature_counts(texts[lo: lo + LANGID_BATCH]) @ self.log_p_t_given_c) + self.log_p_c
            logp -= logp.max(axis=1, keepdims=True)
            probs = np.exp(logp)
            probs /= probs.sum(axis=1, keepdims=True)
            best = probs.argmax(axis=1)
            out += [(self.classes[c], float(probs[i, c])) for i, c in enumerate(best)]
        return out


@functools.lru_cache(maxsize=1)
def langid_model() -> LangidModel:
    return LangidModel()


def identify_languages(texts: list[str], max_chars: int) -> list[tuple[str, float]]:
    """(language, probability) per text, from its first `max_chars` characters."""
    return langid_model().classify([t[:max_chars] for t in texts])


def language_verdicts(texts: list[str], p: dict) -> list[Verdict]:
    wanted = set(p["languages"])
    verdicts = []
    for lang, prob in identify_languages(texts, p["lang_max_chars"]):
        if lang in wanted and prob >= p["lang_min_prob"]:
            verdicts.append(None)
        else:
            verdicts.append((LANGUAGE_RULE, f"lang={lang} prob={prob:.3f}"))
    return verdicts


# ----------------------------------------------------------------------------- signatures for dedup

def normalize_for_dedup(text: str) -> str:
    """Lowercased, punctuation stripped, whitespace collapsed to single spaces: trivial variants collide."""
    return " ".join(PUNCTUATION_RE.sub("", text.lower()).split())


def exact_hash(normalized: str) -> str:
    return xxhash.xxh3_128_hexdigest(normalized.encode("utf-8"))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit flips about half the output bits."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _powers(base: int, n: int) -> np.ndarray:
    """base^k mod 2^64 for k < n (numpy integer products wrap mod 2^64)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def _mod_mersenne_31(v: np.ndarray) -> np.ndarray:
    """v mod p for p = 2^31 - 1 and v < 2^62, without division: 2^31 = 1 (mod p), so v = (v & p) + (v >> 31)
    (mod p); two folds bring v below p + 1, one subtraction below p."""
    shift = np.uint64(31)
    r = (v & MERSENNE_31) + (v >> shift)
    r = (r & MERSENNE_31) + (r >> shift)
    return np.where(r >= MERSENNE_31, r - MERSENNE_31, r)


def shingle_hashes(normalized: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes x(s) in [0, p) of every word n-gram shingle s of each normalized text, and the owning text's index.

    Vectorized over the whole list: texts are joined by newlines, a shingle is the byte span from the start of
    word i to the end of word i+n-1 of the same text, hashed as fmix64(sum_k byte_k * POLY^k mod 2^64) mod p via
    prefix sums (POLY is odd, so a span's hash is shifted to position 0 by POLY^-start). A text with fewer than n
    words has one shingle, all its words; an empty text has none."""
    data = "\n".join(normalized).encode("utf-8")
    if not data.strip():
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    b = np.frombuffer(data, np.uint8)
    sep = (b == 0x20) | (b == 0x0A)
    word_start = np.flatnonzero(~sep & np.concatenate(([True], sep[:-1])))
    word_end = np.flatnonzero(~sep & np.concatenate((sep[1:], [True]))) + 1
    word_doc = np.searchsorted(np.flatnonzero(b == 0x0A), word_start)

    last = np.arange(len(word_start)) + ngram - 1
    full = np.flatnonzero(last < len(word_start))
    full = full[word_doc[last[full]] == word_doc[full]]
    words_per_doc = np.bincount(word_doc, minlength=len(normalized))
    short_docs = np.flatnonzero((words_per_doc > 0) & (words_per_doc < ngram))
    doc_first_word = np.concatenate(([0], np.cumsum(words_per_doc)))[:-1]
    span_start = np.concatenate((word_start[full], word_start[doc_first_word[short_docs]]))
    span_end = np.concatenate((word_end[full + ngram - 1],
                               word_end[doc_first_word[short_docs] + words_per_doc[short_docs] - 1]))
    span_doc = np.concatenate((word_doc[full], short_docs))
    order = np.argsort(span_doc, kind="stable")
    span_start, span_end, span_doc = span_start[order], span_end[order], span_doc[order]

    prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(b * _powers(POLY, len(b)), dtype=np.uint64)))
    h = (prefix[span_end] - prefix[span_start]) * _powers(POLY_INV, len(b))[span_start]
    return _mod_mersenne_31(_fmix64(h) >> np.uint64(2)), span_doc


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a_k, b_k), k < num_perm, drawn from the seed: a_k in [1, p), b_k in [0, p), so a_k x + b_k < 2^62 for x < p."""
    rng = np.random.default_rng(seed)
    p = int(MERSENNE_31)
    a = rng.integers(1, p, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, p, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(normalized: list[str], mp: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(signatures (D, num_perm) uint64, has_shingles (D,) bool): h_k(S_d) = min_{s in S_d} (a_k x(s) + b_k) mod p;
    a document without shingles keeps the all-ones signature and has_shingles False."""
    a, b = minhash_permutations(mp["num_perm"], seed)
    sig = np.full((len(normalized), mp["num_perm"]), np.iinfo(np.uint64).max, dtype=np.uint64)
    has = np.zeros(len(normalized), bool)
    lo = 0
    while lo < len(normalized):
        hi, size = lo, 0
        while hi < len(normalized) and (hi == lo or size + len(normalized[hi]) <= SHINGLE_CHUNK_BYTES):
            size += len(normalized[hi]) + 1
            hi += 1
        x, doc = shingle_hashes(normalized[lo:hi], mp["ngram"])
        doc = doc + lo
        has[doc] = True
        for r0 in range(0, len(x), MINHASH_SLAB_ROWS):
            xs, ds = x[r0: r0 + MINHASH_SLAB_ROWS], doc[r0: r0 + MINHASH_SLAB_ROWS]
            values = _mod_mersenne_31(xs[:, None] * a[None, :] + b[None, :])
            group = np.flatnonzero(np.concatenate(([True], ds[1:] != ds[:-1])))
            docs = ds[group]
            sig[docs] = np.minimum(sig[docs], np.minimum.reduceat(values, group, axis=0))
        lo = hi
    return sig, has


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(D, bands) uint64: band j's hash folds its rows' minima, fmix64(... fmix64(j * C + m_1) * C + m_2 ...)."""
    h = np.broadcast_to(np.arange(bands, dtype=np.uint64), (len(sig), bands)).copy()
    blocks = sig[:, : bands * rows].reshape(len(sig), bands, rows)
    for r in range(rows):
        h = _fmix64(h * BAND_POLY + blocks[:, :, r])
    return h


def minhash_params(p: dict) -> dict:
    """The MinHash settings signatures depend on (recorded with them): num_perm, bands, rows, ngram, seed."""
    mp = {k: int(p["minhash"][k]) for k in ("num_perm", "bands", "rows", "ngram")}
    if mp["bands"] * mp["rows"] > mp["num_perm"]:
        raise common.StageError(f"params {STAGE}.minhash: bands * rows = {mp['bands'] * mp['rows']} "
                                f"> num_perm = {mp['num_perm']}")
    mp["seed"] = int(p["seed"])
    return mp


def sigs_schema(mp: dict, store_signature: bool) -> pa.Schema:
    fields = [("id", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("approx_tokens", pa.int64()),
              ("exact_hash", pa.string()), ("bands", pa.list_(pa.uint64()))]
    if store_signature:
        fields.append(("minhash", pa.list_(pa.uint32())))
    # The MinHash params travel with the signatures, so dedup_index can refuse shards that cannot be compared.
    return pa.schema(fields, metadata={b"minhash": json.dumps(mp, sort_keys=True).encode()})


def _list_column(matrix: np.ndarray, keep: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Row i of `matrix` as a list, or an empty list where keep[i] is False."""
    lengths = np.where(keep, matrix.shape[1], 0)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = matrix[keep].ravel().astype(value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def signature_table(batch: pa.RecordBatch, shard: str, first_row: int, mp: dict, store_signature: bool) -> pa.Table:
    """Sigs rows for the kept documents in `batch`, numbered from `first_row` within the kept shard."""
    texts = batch.column("text").to_pylist()
    normalized = [normalize_for_dedup(t) for t in texts]
    sig, has = minhash_signatures(normalized, mp, mp["seed"])
    columns = {
        "id": batch.column("id"),
        "shard": pa.array([shard] * len(normalized), pa.string()),
        "row": pa.array(np.arange(first_row, first_row + len(normalized), dtype=np.int64)),
        "approx_tokens": batch.column("approx_tokens").cast(pa.int64()),
        # Text that normalizes to nothing (punctuation only) is compared as written, not as the empty string.
        "exact_hash": pa.array([exact_hash(n or raw) for n, raw in zip(normalized, texts)], pa.string()),
        "bands": _list_column(band_hashes(sig, mp["bands"], mp["rows"]), has, pa.uint64()),
    }
    if store_signature:
        columns["minhash"] = _list_column(sig, has, pa.uint32())  # values < p = 2^31 - 1
    return pa.Table.from_pydict(columns, schema=sigs_schema(mp, store_signature))


# ----------------------------------------------------------------------------- the stage

def shard_paths(output_dir: str | Path, shard: str) -> dict[str, Path]:
    out = Path(output_dir)
    return {"kept": out / "kept" / f"{shard}.parquet", "rejected": out / "rejected" / f"{shard}.parquet",
            "sigs": out / "sigs" / f"{shard}.parquet", "manifest": out / f"{shard}.manifest.json"}


def _check_input(path: Path) -> pa.Schema:
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise common.StageError(f"{path}: not a readable Parquet shard ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise common.StageError(f"{path}: missing columns {missing} (has {schema.names})")
    return schema


def filter_verdicts(texts: list, domains: list, p: dict, plan: RulePlan, path: Path, first_row: int) -> list[Verdict]:
    """One verdict per document: None (kept) or (rule, detail) from the first rule that fires, language last."""
    verdicts, ask_language = [], []
    for i, (text, domain) in enumerate(zip(texts, domains)):
        if text is None:
            raise common.StageError(f"{path}: row {first_row + i}: text is null")
        rules, runs_language, rule_params = plan.for_domain(domain)
        verdict = first_failing_rule(Doc(text), rules, rule_params)
        verdicts.append(verdict)
        if verdict is None and runs_language:
            ask_language.append(i)
    if ask_language:
        for i, verdict in zip(ask_language, language_verdicts([texts[i] for i in ask_language], p)):
            verdicts[i] = verdict
    return verdicts


def filter_shard(input_path: str | Path, output_dir: str | Path, shard: str, p: dict) -> dict:
    """Filter one ingest shard; returns its manifest. kept + rejected == input, checked."""
    from tqdm import tqdm
    input_path = Path(input_path)
    schema = _check_input(input_path)
    plan = RulePlan(p)
    mp = minhash_params(p)
    store_signature = bool(p["minhash"]["store_signature"])
    paths = shard_paths(output_dir, shard)
    rejected_schema = schema.append(pa.field("rule", pa.string())).append(pa.field("detail", pa.string()))
    rule_names = plan.names()
    docs = Counter({r: 0 for r in rule_names})
    tokens = Counter({r: 0 for r in rule_names})
    n_in = n_kept = tokens_in = tokens_kept = 0

    with contextlib.ExitStack() as stack:
        write_kept = stack.enter_context(common.table_writer(paths["kept"], schema))
        write_rejected = stack.enter_context(common.table_writer(paths["rejected"], rejected_schema))
        write_sigs = stack.enter_context(common.table_writer(paths["sigs"], sigs_schema(mp, store_signature)))
        bar = stack.enter_context(tqdm(total=common.count_rows(input_path), desc=f"filter {shard}", unit="doc",
                                       file=sys.stderr, disable=None, leave=False))
        for batch in common.iter_record_batches(input_path):
            texts = batch.column("text").to_pylist()
            verdicts = filter_verdicts(texts, batch.column("domain").to_pylist(), p, plan, input_path, n_in)
            keep = pa.array([v is None for v in verdicts])
            kept = batch.filter(keep)
            rejected = batch.filter(pc.invert(keep))
            fired = [v for v in verdicts if v is not None]
            rejected = pa.Table.from_batches([rejected]).append_column(
                "rule", pa.array([v[0] for v in fired], pa.string())).append_column(
                "detail", pa.array([v[1] for v in fired], pa.string()))
            write_kept(pa.Table.from_batches([kept], schema=schema))
            write_rejected(rejected)
            write_sigs(signature_table(kept, shard, n_kept, mp, store_signature))

            batch_tokens = batch.column("approx_tokens").to_pylist()
            for verdict, t in zip(verdicts, batch_tokens):
                if verdict is not None:
                    docs[verdict[0]] += 1
                    tokens[verdict[0]] += t
            n_in += len(batch)
            n_kept += len(kept)
            tokens_in += sum(batch_tokens)
            tokens_kept += pc.sum(kept.column("approx_tokens")).as_py() or 0
            bar.update(len(batch))

    common.check_conservation(STAGE, shard, n_in, kept=common.count_rows(paths["kept"]),
                              rejected=common.count_rows(paths["rejected"]))
    counts = {"in": n_in, "kept": n_kept, "rejected": dict(sorted(docs.items())),
              "approx_tokens_in": tokens_in, "approx_tokens_kept": tokens_kept,
              "approx_tokens_rejected": dict(sorted(tokens.items()))}
    return common.write_manifest(paths["manifest"], stage=STAGE, params=p, inputs=[input_path],
                                 outputs=[paths["kept"], paths["rejected"], paths["sigs"]], counts=counts,
                                 code=common.code_version(f"stages.{STAGE}"), extra={"minhash": mp})


def filter_shards(input_dir: str | Path, output_dir: str | Path, p: dict, shard: str | None = None) -> dict[str, str]:
    """Filter one shard (`shard`) or every shard of `input_dir` whose outputs are not current."""
    input_dir = Path(input_dir)
    shards = [shard] if shard else common.list_shards(input_dir)
    code = common.code_version(f"stages.{STAGE}")

    def process(name: str) -> None:
        path = common.input_shard(input_dir, name)
        filter_shard(path, output_dir, name, p)

    def is_done(name: str) -> bool:
        return shard is None and common.manifest_is_current(
            shard_paths(output_dir, name)["manifest"], p, [input_dir / f"{name}.parquet"], code)

    return common.run_sharded(shards, process, is_done, desc=STAGE)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--input-dir", required=True, help="artifacts/<scale>/ingest")
    ap.add_argument("--output-dir", required=True, help="artifacts/<scale>/filter")
    ap.add_argument("--shard", default=None, help="one shard name (file stem); all shards when omitted")
    args = ap.parse_args()
    try:
        filter_shards(args.input_dir, args.output_dir, common.resolve_cli_params(args, STAGE), args.shard)
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
