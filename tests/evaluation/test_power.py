"""The sample-size note: Noether's approximation against the simulated power of scipy's Wilcoxon test."""

import math

import numpy as np
import pytest
from scipy import stats

from neurohybrid.evaluation.power import attainable_n, subjects_needed, walsh_probability


def simulated_power(delta: float, n: int, alpha: float, rng, sims: int = 2000) -> float:
    x = rng.normal(delta, 1.0, size=(sims, n))
    return float((stats.wilcoxon(x, axis=1).pvalue <= alpha).mean())


@pytest.mark.parametrize("alpha", [0.05, 0.05 / 21])  # one test; the first Holm step of 21 comparisons
def test_subjects_needed_gives_the_planned_power(alpha):
    """Differences N(0.5, 1) (p' = Phi(0.5 sqrt 2) = 0.76): at the n the note asks for, the
    two-sided Wilcoxon test rejects in about 80% of simulated studies; at half of it, far fewer."""
    rng = np.random.default_rng(5)
    # the measured differences: 400 evenly spaced quantiles of N(0.5, 1) (a random sample's p' would
    # add its own sampling error to what is tested here)
    measured = 0.5 + stats.norm.ppf((np.arange(400) + 0.5) / 400)
    n, p, note = subjects_needed(measured, alpha, power=0.8)
    assert p == pytest.approx(stats.norm.cdf(0.5 * math.sqrt(2)), abs=0.005) and note == ""
    assert 0.75 <= simulated_power(0.5, int(n), alpha, rng) <= 0.92
    assert simulated_power(0.5, int(n) // 2, alpha, rng) < 0.6


def test_walsh_probability_and_bounds():
    assert walsh_probability([1.0, 2.0, 3.0]) == 1.0
    assert walsh_probability([-1.0, 1.0]) == 0.5  # the one pair sums to 0: counted one half
    assert math.isnan(walsh_probability([1.0]))
    # 2 / 2^n <= alpha: 6 pairs reach 0.05, 11 reach 0.05 / 21
    assert attainable_n(0.05) == 6 and attainable_n(0.05 / 21) == 10
    assert 2 / 2 ** attainable_n(0.05 / 21) <= 0.05 / 21 < 2 / 2 ** (attainable_n(0.05 / 21) - 1)


def test_subjects_needed_edge_cases():
    n, p, note = subjects_needed([1.0, -1.0, 2.0, -2.0], 0.05)
    assert math.isnan(n) and p == 0.5 and "no direction" in note
    n, p, note = subjects_needed([0.3], 0.05)
    assert math.isnan(n) and "fewer than 2" in note
    # every difference of one sign: the formula's floor, never below what the exact test can attain
    n, p, note = subjects_needed([0.1, 0.2, 0.3, 0.4], 0.05 / 21)
    assert p == 1.0 and "floor" in note and n >= attainable_n(0.05 / 21)
