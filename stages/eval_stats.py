"""95% intervals for accuracies, and paired comparisons of two checkpoints on the same problems.

An accuracy over P problems gets one of two intervals:
  - Wilson score interval (stages.tasks.wilson_interval) on the count correct, when the P values are independent
    Bernoulli trials: one sample per problem, each scored 0 or 1.
  - Percentile bootstrap over problems otherwise (avg@k over k > 1 samples, whose samples of one problem are not
    independent; fractional scores such as judge ties): the problem is the unit; R resamples of P problems with
    replacement, the 2.5% and 97.5% quantiles of the resampled means. Seeded, so the same inputs give the same bounds.
    When every problem scores 0 (or every one 1), every resample is the same and the bootstrap interval has no width;
    the interval is then Wilson's for 0/P (P/P), what one sample per problem would give: 0 of P is not certainty.
    Known limit: with few non-zero problems the percentile bootstrap covers less than its nominal 95%; read such an
    interval as the least uncertainty there is.

Comparison of checkpoints A -> B (paired bootstrap over problems): d_p = x_B,p - x_A,p over the problems both were
scored on; resample problems R times (the same indices for both checkpoints, which keeps each problem's pairing and
so removes the between-problem variance that an unpaired test would count), the 95% percentile interval of mean(d).
Verdict: BEYOND when 0 lies outside the interval (a gain or a loss told from noise), else INSIDE. Like the
bootstrap above it is optimistic when few problems differ: 4 problems gained and none lost reads BEYOND at R = 2000,
where an exact sign test gives p = 0.125; a screen for noise, not a significance test.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from stages import common
from stages.tasks import wilson_interval

BEYOND = "beyond the interval"
INSIDE = "inside the interval"
QUANTILES = (0.025, 0.975)


def derived_seed(seed: int, *key: object) -> int:
    """A seed per (seed, key...): the first 63 bits of sha256("seed/key/..."), so each sample, benchmark and
    comparison draws the same whatever else runs beside it (evaluate.sample_seed: key = benchmark, problem, sample)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *key))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] problem indices drawn with replacement (numpy PCG64 seeded by `seed`)."""
    if n < 1 or resamples < 1:
        raise common.StageError(f"bootstrap needs n >= 1 problems and resamples >= 1, got n={n}, {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(values[indices].mean(axis=1), QUANTILES)
    return float(low), float(high)


def bootstrap_interval(values: Sequence[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of mean(values), resampling the values (one per problem)."""
    values = np.asarray(values, dtype=np.float64)
    return _percentiles(values, bootstrap_indices(len(values), resamples, seed))


def accuracy_interval(values: Sequence[float], bernoulli: bool, resamples: int,
                      seed: int) -> tuple[tuple[float, float], str]:
    """(95% interval of mean(values), method): Wilson when `bernoulli` (each value the 0/1 verdict of one independent
    sample), else the bootstrap over problems."""
    if bernoulli and any(v not in (0.0, 1.0) for v in values):
        raise common.StageError("a Wilson interval needs 0/1 values; use the bootstrap for fractional scores")
    if bernoulli or set(values) in ({0.0}, {1.0}):
        interval = wilson_interval(int(sum(values)), len(values))
    else:
        interval = bootstrap_interval(values, resamples, seed)
    return interval, "wilson" if bernoulli else f"bootstrap({resamples})"


def paired_difference(before: dict[str, float], after: dict[str, float], resamples: int, seed: int) -> dict | None:
    """after - before over the problems both scored (per-problem accuracies keyed by problem id): {"n", "delta",
    "ci95_low", "ci95_high", "verdict"}; None when they share no problem."""
    shared = sorted(set(before) & set(after))
    if not shared:
        return None
    diff = np.array([after[p] - before[p] for p in shared], dtype=np.float64)
    low, high = _percentiles(diff, bootstrap_indices(len(diff), resamples, seed))
    return {"n": len(shared), "delta": float(diff.mean()), "ci95_low": low, "ci95_high": high,
            "verdict": INSIDE if low <= 0.0 <= high else BEYOND}
