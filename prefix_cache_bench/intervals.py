"""Statistics, all of it: the hit-vs-cold ratio's Fieller interval, Student's t interval of a
mean, distribution-free quantile intervals, batch means and throughput intervals, and whether two
estimates agree. numpy and scipy only: no vLLM, no torch (tests/test_architecture.py checks).

Intervals are t-based (scipy.stats.t), not bootstrapped: on simulated runs of 10 rounds a
paired BCa bootstrap held the true saving only 83-93% of the time, Fieller's interval 94-97%
(tests/test_stats.py checks this).
"""

from collections.abc import Sequence
from typing import TypeAlias, TypeVar

import numpy as np

from .defaults import LOAD_BATCHES

Values: TypeAlias = Sequence[float] | np.ndarray     # a sample: a list of numbers, or a numpy array of them
Ratio = TypeVar("Ratio", float, np.ndarray)          # a ratio, or an array of ratios


def saving_pct(hit_to_cold: Ratio) -> Ratio:
    """How much of the cold TTFT a hit saves, from the ratio mean(hit) / mean(cold)."""
    return (1 - hit_to_cold) * 100


def degradation_pct(miss_to_hit: Ratio) -> Ratio:
    """The design's ttft_degradation_pct, (miss - hit) / hit x 100, from mean(miss) / mean(hit)."""
    return (miss_to_hit - 1) * 100


def ratio_ci95(numerator: Values, denominator: Values, paired: bool) -> tuple[float, list[float]]:
    """mean(numerator) / mean(denominator) and its 95% Fieller interval.

    paired: the i-th values belong together (the same round), and their covariance, the
    level the machine was at during that round, cancels in the ratio. Fieller's interval
    is exact for normal means and, unlike a bootstrap, holds its coverage at 10 rounds."""
    from scipy import stats
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    n = min(len(num), len(den))
    ratio = num.mean() / den.mean()
    var_num, var_den = num.var(ddof=1) / len(num), den.var(ddof=1) / len(den)
    cov = np.cov(num, den, ddof=1)[0, 1] / n if paired else 0.0
    t2 = stats.t.ppf(0.975, n - 1) ** 2
    # the ratios r with (mean_num - r mean_den)^2 <= t^2 var(mean_num - r mean_den): a quadratic in r
    a = den.mean() ** 2 - t2 * var_den
    b = num.mean() * den.mean() - t2 * cov
    c = num.mean() ** 2 - t2 * var_num
    root = b * b - a * c
    if a <= 0 or root < 0:           # the denominator's mean is not clearly above zero: no finite interval
        return ratio, [-np.inf, np.inf]
    return ratio, [(b - root ** 0.5) / a, (b + root ** 0.5) / a]


def mean_ci95(values: Values) -> list[float]:
    """Student's t interval of the mean; [nan, nan] for fewer than 2 values (a result file
    writes null): one value has no spread to take an interval from."""
    from scipy import stats
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return [float("nan")] * 2
    if np.ptp(values) == 0:
        return [float(values[0])] * 2
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return [float(low), float(high)]


def agree(estimate_1: float, ci_1: Sequence[float], estimate_2: float, ci_2: Sequence[float]) -> bool:
    """Do two estimates agree within their combined uncertainty? |e1 - e2| <= sqrt(h1^2 + h2^2),
    each h the half-width of that interval on the side facing the other estimate."""
    (high, high_ci), (low, low_ci) = sorted([(estimate_1, ci_1), (estimate_2, ci_2)], key=lambda e: -e[0])
    return bool(high - low <= ((high - high_ci[0]) ** 2 + (low_ci[1] - low) ** 2) ** 0.5)


def quantile_ci95(values: Values, q: float) -> list[float | None]:
    """Distribution-free 95% interval of the q-quantile: the order statistics whose ranks a
    binomial(n, q) count falls between with at least 95% probability. A bound the sample is too
    small for is None (the 99th percentile of 50 requests has no upper bound)."""
    from scipy import stats
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        return [None, None]
    low_rank = int(stats.binom.ppf(0.025, n, q))           # 1-based ranks of the bounds
    high_rank = int(stats.binom.ppf(0.975, n, q)) + 1
    return [float(x[low_rank - 1]) if low_rank >= 1 else None,
            float(x[high_rank - 1]) if high_rank <= n else None]


def batch_means_ci95(values: Values, num_batches: int = LOAD_BATCHES) -> list[float] | list[None]:
    """95% t-interval of a mean from the means of consecutive batches: requests sent close in
    time share the server's state, so single requests are not independent, batches nearly are."""
    values = np.asarray(values, dtype=float)
    k = min(num_batches, len(values) // 2)
    if k < 2:
        return [None, None]
    return mean_ci95([batch.mean() for batch in np.array_split(values, k)])


def throughput_ci95(start_times_s: Values, end_times_s: Values, num_batches: int = LOAD_BATCHES) -> list[float] | list[None]:
    """95% t-interval of completions per second, over equal time slices of the span from the
    first send to the last completion: the span the throughput itself is taken over, so the
    slices' mean rate is that throughput."""
    ends = np.asarray(end_times_s, dtype=float)
    first = float(np.min(start_times_s)) if len(start_times_s) else 0.0
    k = min(num_batches, len(ends) // 2)
    if k < 2 or ends.max() <= first:
        return [None, None]
    edges = np.linspace(first, ends.max(), k + 1)
    counts = np.histogram(ends, bins=edges)[0]
    return mean_ci95(counts / np.diff(edges))
