"""The benchmarks' paired ratio: its interval is the sign test's (ranks from the binomial table), so a claim such as
"compiled is faster" (upper end below 1) holds with the stated confidence."""

import math
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from timing import paired_ratio  # noqa: E402


def test_interval_ranks_are_the_sign_tests():
    # 95% sign-test ranks (1-based) for the median, from the binomial distribution: n=6 → (1, 6), n=16 → (4, 13),
    # n=40 → (14, 27). Ratios 1..n make the returned values their own ranks.
    for n, lo, hi in ((6, 1, 6), (16, 4, 13), (40, 14, 27)):
        a, b = [float(i) for i in range(1, n + 1)], [1.0] * n
        rng = random.Random(n)
        pairs = list(zip(a, b))
        rng.shuffle(pairs)  # the ranks come from sorting the ratios, not from the round order
        med, low, high = paired_ratio([p[0] for p in pairs], [p[1] for p in pairs])
        assert (low, high) == (lo, hi)
        assert med == (n + 1) / 2
    med, low, high = paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)  # too few rounds for 95%
    assert med == 3.0 and math.isnan(low) and math.isnan(high)


def test_interval_covers_the_true_median_at_least_95_percent():
    # rounds whose time drifts (a load that hits both functions of a round alike) and a true ratio of 0.98
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        load = [1 + 0.3 * rng.random() for _ in range(24)]
        b = [x * (1 + rng.gauss(0, 0.02)) for x in load]
        a = [x * 0.98 * (1 + rng.gauss(0, 0.02)) for x in load]
        _, low, high = paired_ratio(a, b)
        covered += low <= 0.98 <= high
    assert 0.95 <= covered / 2000 <= 0.995
