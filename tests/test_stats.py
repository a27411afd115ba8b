"""e2h_min.analysis.stats: the bootstrap of the mean over seeds, against a brute-force enumeration of every resample."""

import itertools
import math

import numpy as np
import pytest

from e2h_min.analysis import stats


def brute_force_interval(values, confidence=0.95):
    """Every one of the n^n ordered resamples, equally likely: the textbook definition, no multinomial weights."""
    n = len(values)
    means = sorted(sum(values[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))
    tail = (1 - confidence) / 2
    # inverse CDF: the smallest mean whose cumulative share reaches q
    pick = lambda q: means[max(0, math.ceil(q * len(means) - 1e-9) - 1)]  # noqa: E731
    return pick(tail), pick(1 - tail)


@pytest.mark.parametrize("values", [[0.2, 0.5, 0.9], [0.1, 0.1, 0.4, 0.8], [0.3, 0.2, 0.25, 0.6, 0.55],
                                    [0.0, 1.0], [0.7, 0.1, 0.4, 0.4, 0.9, 0.2]])
def test_exact_bootstrap_matches_enumerating_every_resample(values):
    means, probs = stats.bootstrap_means(values)
    assert probs.sum() == pytest.approx(1.0)
    assert len(means) == math.comb(2 * len(values) - 1, len(values))  # one per multiset of counts
    mean, low, high = stats.percentile_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx(brute_force_interval(values))
    # the bootstrap distribution's own mean is the sample mean (resampling is unbiased for the mean)
    assert float(means @ probs) == pytest.approx(np.mean(values))


def test_three_seeds_give_their_range_and_five_seeds_give_less():
    assert stats.percentile_interval([0.3, 0.1, 0.2]) == pytest.approx((0.2, 0.1, 0.3))
    mean, low, high = stats.percentile_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    assert 0.1 < low < mean < high < 0.5


def test_equal_values_have_a_zero_width_interval_and_one_value_is_its_own_interval():
    assert stats.percentile_interval([0.25] * 4) == pytest.approx((0.25, 0.25, 0.25))
    assert stats.percentile_interval([0.7]) == pytest.approx((0.7, 0.7, 0.7))


def test_many_seeds_use_a_seeded_monte_carlo_close_to_the_normal_approximation():
    values = list(np.linspace(0, 1, 20))
    first, second = stats.percentile_interval(values), stats.percentile_interval(values)
    assert first == second  # seeded: the same table on every run
    mean, low, high = first
    half_width = 1.96 * np.std(values) / math.sqrt(len(values))  # bootstrap SE uses the ddof=0 std
    assert low == pytest.approx(mean - half_width, abs=0.01) and high == pytest.approx(mean + half_width, abs=0.01)


def test_paired_difference_uses_only_shared_seeds_and_pairs_them():
    treated, base = {0: 0.5, 1: 0.7, 3: 0.9}, {0: 0.4, 1: 0.4, 2: 0.0}
    mean, low, high, n = stats.paired_difference(treated, base)
    assert n == 2 and (mean, low, high) == pytest.approx((0.2, 0.1, 0.3))
    # pairing removes a shared seed effect: a constant gain over noisy seeds has a zero-width interval
    noisy = {s: v for s, v in enumerate([0.1, 0.6, 0.3, 0.9])}
    assert stats.paired_difference({s: v + 0.05 for s, v in noisy.items()}, noisy)[:3] == pytest.approx((0.05,) * 3)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one value"):
        stats.bootstrap_means([])
    with pytest.raises(ValueError, match="confidence"):
        stats.percentile_interval([0.1, 0.2], confidence=1.0)
    with pytest.raises(ValueError, match="both"):
        stats.paired_difference({0: 0.1}, {1: 0.2})
