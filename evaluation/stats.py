"""Bootstrap intervals and verdicts: is one arm's metric really better than another's, or within noise?

Every rate and mean in the reproduction's tables carries a percentile bootstrap 95 % interval over its
samples (Efron: resample the n per-sample values with replacement, recompute the statistic, take the 2.5 and
97.5 percentiles). Two arms are compared by the interval of the difference of their statistics, each arm
resampled on its own (unpaired: the arms sample the same formulas, but not the same structures); the
difference is "better" or "worse" only when that interval excludes zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], float]


def _clean(values: Sequence[float]) -> np.ndarray:
    """Finite values as float64 (NaN marks a sample without that measurement)."""
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of `values`, vectorised: [resamples]."""
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % bootstrap interval over `n` samples (NaN when there are none)."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of the finite `values` (a rate when they are 0/1) and its percentile bootstrap interval."""
    clean = _clean(values)
    if len(clean) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    means = bootstrap_means(clean, resamples, np.random.default_rng(seed))
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(clean.mean()), float(low), float(high), len(clean))


@dataclass(frozen=True)
class Comparison:
    """mean(b) - mean(a) with its 95 % bootstrap interval, and what it means for a metric where
    `higher_is_better`: "better" (b beats a), "worse", or "within noise" (the interval holds 0)."""

    difference: Estimate
    verdict: str


def compare_means(
    a: Sequence[float], b: Sequence[float], higher_is_better: bool, resamples: int = 2000, seed: int = 0
) -> Comparison:
    """Unpaired bootstrap of mean(b) - mean(a) (each arm resampled on its own)."""
    a_clean, b_clean = _clean(a), _clean(b)
    if len(a_clean) == 0 or len(b_clean) == 0:
        return Comparison(Estimate(float("nan"), float("nan"), float("nan"), 0), "not measured")
    rng = np.random.default_rng(seed)
    differences = bootstrap_means(b_clean, resamples, rng) - bootstrap_means(a_clean, resamples, rng)
    low, high = np.percentile(differences, [2.5, 97.5])
    estimate = Estimate(float(b_clean.mean() - a_clean.mean()), float(low), float(high), len(b_clean))
    if low <= 0.0 <= high:
        return Comparison(estimate, "within noise")
    gained = low > 0.0 if higher_is_better else high < 0.0
    return Comparison(estimate, "better" if gained else "worse")
