"""pass@k: the chance that at least one of k samples drawn from n (c of them correct) is correct.

The unbiased estimator (Chen et al. 2021, spec section 8) draws k of the n samples without replacement:

    pass@k = 1 - C(n - c, k) / C(n, k)

C(n, k) overflows floats for the n used in practice (C(256, 128) ~ 1e75), so the ratio is written as a product of
k terms each in [0, 1]:

    C(n - c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)

(the c factors i = n-c+1 .. n; when n - c < k some factor is 0 and pass@k is exactly 1).
"""

from __future__ import annotations

import math
import operator


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct.

    Exact at the ends: c = 0 gives 0.0 (empty product), and any c > n - k gives 1.0 (a zero factor), c = n included.
    Examples: pass_at_k(2, 1, 1) = 0.5; pass_at_k(4, 1, 2) = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5;
    pass_at_k(10, 0, 5) = 0.0; pass_at_k(10, 10, 1) = 1.0.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)  # ints (numpy ints too), never floats
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}; draw at least k samples")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must be in 0..n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_counts: list[int], n: int, k: int) -> float:
    """pass@k averaged over problems, each with n samples and its own correct count.

    Example: mean_pass_at_k([0, 4], n=4, k=2) = (0.0 + 1.0) / 2 = 0.5.
    """
    if not correct_counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def pass_at_k_by_level(counts: dict[str, list[int]], n: int, ks: list[int]) -> dict[str, dict[str, float]]:
    """Per level: pass@k for each k (mean_pass_at_k) and the share of correct samples, from each problem's count of
    correct samples out of n. Example: ({"L0": [0, 4]}, n=4, ks=[1, 2])
    -> {"L0": {"pass@1": 0.5, "pass@2": 0.5, "sample_accuracy": 0.5}}."""
    return {name: {**{f"pass@{k}": mean_pass_at_k(cs, n, k) for k in ks}, "sample_accuracy": sum(cs) / len(cs) / n}
            for name, cs in counts.items()}
