"""Language id: langid.py (Lui & Baldwin 2012, "langid.py: An Off-the-shelf Language Identification Tool"), its
naive Bayes model as shipped, with the feature extraction vectorized over a batch of texts (same counts, same
probabilities as langid's own classify; tests/test_filter.py checks both). FineWeb keeps English at
probability >= 0.65 (with fastText's lid.176; langid stands in offline).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from stages import common
from stages.filters.base import Verdict

LANGUAGE_RULE = "language"
# Texts per langid matmul: bounds the temporary arrays, not the shard.
LANGID_BATCH = 256


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


def _derive_arrays() -> dict[str, np.ndarray]:
    """The model as arrays: langid's log P(t|c), log P(c), classes, and each feature's byte length and value (read off
    the Aho-Corasick automaton's states). ~2.3 s, most of it langid unpacking its model string."""
    ident = langid_identifier()
    n_features = ident.nb_numfeats
    depth, value = _automaton_strings(np.asarray(ident.tk_nextmove, np.int64).reshape(-1, 256))
    feature_len = np.full(n_features, LangidModel.MAX_FEATURE_BYTES + 1, np.int64)
    feature_value = np.zeros(n_features, np.int64)
    for state, features in ident.tk_output.items():
        for f in features:
            # A state outputs every feature that is a suffix of its string; the feature's own state is the shortest.
            if depth[state] < feature_len[f]:
                feature_len[f], feature_value[f] = depth[state], value[state]
    return {"log_p_t_given_c": np.asarray(ident.nb_ptc), "log_p_c": np.asarray(ident.nb_pc),
            "classes": np.asarray([str(c) for c in ident.nb_classes]), "feature_len": feature_len,
            "feature_value": feature_value}


def cache_path() -> Path:
    """Where the derived arrays are kept, keyed by the model string's hash (a langid upgrade misses the cache):
    $NANBEIGE_CACHE, else ~/.cache/nanbeige. Every filter shard is its own process, and unpacking langid's model cost
    each one ~2.3 s of a ~4.4 s tiny shard."""
    import hashlib

    from langid import langid
    root = Path(os.environ.get("NANBEIGE_CACHE") or Path.home() / ".cache" / "nanbeige")
    return root / f"langid-{hashlib.sha256(langid.model).hexdigest()[:16]}.npz"


def model_arrays() -> dict[str, np.ndarray]:
    """_derive_arrays(), read from cache_path() when it is there (an unreadable file is derived again and replaced);
    written atomically, and skipped when the cache directory is not writable."""
    path = cache_path()
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in ("log_p_t_given_c", "log_p_c", "classes", "feature_len", "feature_value")}
    except (OSError, KeyError, ValueError):
        pass
    arrays = _derive_arrays()
    try:
        with common.atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez(path) appends ".npz"
            np.savez(fh, **arrays)
    except OSError:
        pass
    return arrays


class LangidModel:
    """langid.py's naive Bayes language identifier with its feature extraction vectorized.

    langid counts n_t(d), the occurrences of each of its byte n-gram features t (1..4 bytes) in the UTF-8
    text, by running an Aho-Corasick automaton one Python step per byte. The automaton's states are exactly
    the prefixes of the features, so the same counts come from looking every 1..4-byte window up in tables
    of the features (direct tables for 1..3 bytes, a sorted array for 4 bytes). Then
    log P(c | d) = sum_t n_t(d) log P(t | c) + log P(c), softmax over the classes c."""

    MAX_FEATURE_BYTES = 4

    def __init__(self, arrays: dict[str, np.ndarray] | None = None):
        arrays = model_arrays() if arrays is None else arrays
        self.log_p_t_given_c = arrays["log_p_t_given_c"]
        self.log_p_c = arrays["log_p_c"]
        self.classes = [str(c) for c in arrays["classes"]]
        feature_len, feature_value = arrays["feature_len"], arrays["feature_value"]
        self.n_features = len(feature_len)
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
