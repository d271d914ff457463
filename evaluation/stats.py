"""Bootstrap intervals and verdicts: is one arm's metric really better than another's, or within noise?

Every rate and mean in the reproduction's tables carries a percentile bootstrap 95 % interval over its
samples (Efron: resample the n per-sample values with replacement, recompute the statistic, take the 2.5 and
97.5 percentiles). Two arms are compared by the interval of the difference of their statistics; the difference
is "better" or "worse" only when that interval excludes zero. Arms that sampled the same prompts are compared
paired by prompt (`compare_paired`): per prompt the difference of the two arms' means, resampled over prompts,
which removes the spread between prompts (an energy per atom depends mostly on the composition) from the
interval. Otherwise each arm is resampled on its own (`compare_means`).
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


# Fewer samples (or prompts, paired) than this give no verdict: a bootstrap of one or two values has an
# interval of zero width that says nothing.
MIN_FOR_VERDICT = 5


def _verdict(estimate: Estimate, higher_is_better: bool) -> Comparison:
    if estimate.n == 0:
        return Comparison(estimate, "not measured")
    if estimate.n < MIN_FOR_VERDICT:
        return Comparison(estimate, "too few to tell")
    if estimate.low <= 0.0 <= estimate.high:
        return Comparison(estimate, "within noise")
    gained = estimate.low > 0.0 if higher_is_better else estimate.high < 0.0
    return Comparison(estimate, "better" if gained else "worse")


def compare_paired(
    a: Sequence[float],
    a_keys: Sequence[str],
    b: Sequence[float],
    b_keys: Sequence[str],
    higher_is_better: bool,
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Paired bootstrap of mean over prompts k of (mean_b(k) - mean_a(k)), over the prompts both arms have a
    finite value for; `n` of the estimate counts those prompts."""

    def by_key(values: Sequence[float], keys: Sequence[str]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for value, key in zip(values, keys, strict=True):
            if np.isfinite(value):
                groups.setdefault(key, []).append(float(value))
        return {key: float(np.mean(v)) for key, v in groups.items()}

    a_means, b_means = by_key(a, a_keys), by_key(b, b_keys)
    common = sorted(set(a_means) & set(b_means))
    if not common:
        return Comparison(Estimate(float("nan"), float("nan"), float("nan"), 0), "not measured")
    differences = np.array([b_means[k] - a_means[k] for k in common])
    means = bootstrap_means(differences, resamples, np.random.default_rng(seed))
    low, high = np.percentile(means, [2.5, 97.5])
    return _verdict(
        Estimate(float(differences.mean()), float(low), float(high), len(common)), higher_is_better
    )


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
    return _verdict(estimate, higher_is_better)
