"""Intervals over seeds for the schedule comparison (`python -m e2h_min.analysis.report`): a bootstrap of the mean.

A sweep gives each schedule a handful of seeds (3-5), so the question "is E2H better than balanced on L2?" is
answered with an interval, not a mean: the 95% percentile bootstrap interval of the mean over seeds, and of the
mean paired difference (the same seed under two schedules: the same warm start, the same evaluation problems,
the same sampling noise at step 0, so most of the seed-to-seed noise cancels in the difference).

With n values there are only n^n equally likely resamples, so for n <= EXACT_MAX_N the bootstrap distribution
is enumerated exactly (each multiset of counts weighted by its multinomial probability): no Monte Carlo noise,
the same interval on every machine. Larger n draws MONTE_CARLO_RESAMPLES resamples with a fixed seed.

Read the interval for what it is: with 3 seeds the 95% interval is the range of the 3 values (a resample of
three copies of the smallest value has probability 1/27 > 2.5%), and a bootstrap over so few seeds understates
the spread a new seed could show. An interval that excludes 0 with 3 seeds is a weak signal; with 5 seeds the
ends move inside the range.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

import numpy as np

EXACT_MAX_N = 8  # C(2n-1, n) multisets: 6,435 for n = 8
MONTE_CARLO_RESAMPLES = 100_000


def _count_vectors(n: int):
    """Every vector of n non-negative counts summing to n (stars and bars), as tuples. n=2 -> (2,0), (1,1), (0,2)."""
    for bars in combinations(range(2 * n - 1), n - 1):
        edges = (-1,) + bars + (2 * n - 1,)
        yield tuple(edges[i + 1] - edges[i] - 1 for i in range(n))


def bootstrap_means(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(resample means [M], their probabilities [M]) of the bootstrap distribution of the mean of `values` [n].

    Exact for n <= EXACT_MAX_N: M = C(2n-1, n) count vectors c (sum n), mean = sum_i c_i v_i / n, probability =
    n! / (prod_i c_i!) / n^n. Otherwise M = MONTE_CARLO_RESAMPLES draws (seeded), each probability 1/M.
    Example: [0, 1] -> means [1, 0.5, 0] with probabilities [1/4, 1/2, 1/4] (in some order).
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        raise ValueError("bootstrap_means needs at least one value")
    if n > EXACT_MAX_N:
        rng = np.random.default_rng(0)
        means = v[rng.integers(0, n, size=(MONTE_CARLO_RESAMPLES, n))].mean(axis=1)
        return means, np.full(MONTE_CARLO_RESAMPLES, 1.0 / MONTE_CARLO_RESAMPLES)
    counts = np.array(list(_count_vectors(n)), dtype=np.float64)  # [M, n]
    log_weight = math.lgamma(n + 1) - np.sum([[math.lgamma(c + 1) for c in row] for row in counts], axis=1) \
        - n * math.log(n)
    return counts @ v / n, np.exp(log_weight)


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap interval of that mean.

    low = the smallest resample mean m with P(mean* <= m) >= (1 - confidence)/2, high = the smallest m with
    P(mean* <= m) >= 1 - (1 - confidence)/2 (inverse CDF of the bootstrap distribution, bootstrap_means).
    Example: percentile_interval([1, 2, 3]) -> (2.0, 1.0, 3.0) (with 3 values: the range, see the module doc).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    means, probs = bootstrap_means(values)
    order = np.argsort(means, kind="stable")
    means, cdf = means[order], np.cumsum(probs[order])
    tail = (1 - confidence) / 2

    def quantile(q: float) -> float:  # a 1e-12 slack: the cumulative sum of exact probabilities rounds
        return float(means[min(np.searchsorted(cdf, q - 1e-12), len(means) - 1)])

    return float(np.mean(values)), quantile(tail), quantile(1 - tail)


def paired_difference(treatment: dict[int, float], baseline: dict[int, float],
                      confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of treatment[s] - baseline[s] over the seeds s both have, with its bootstrap interval.

    Pairing by seed removes what the two runs share (warm start, evaluation problems, sampling noise until their
    draws differ). Example: ({0: .5, 1: .7}, {0: .4, 1: .4, 2: .9}) -> differences [.1, .3] -> (.2, .1, .3, 2).
    """
    seeds = sorted(set(treatment) & set(baseline))
    if not seeds:
        raise ValueError("paired_difference needs at least one seed present in both")
    mean, low, high = percentile_interval([treatment[s] - baseline[s] for s in seeds], confidence)
    return mean, low, high, len(seeds)
