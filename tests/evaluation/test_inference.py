"""Bootstrap intervals, the paired Wilcoxon test, its smallest attainable p, and Holm."""

import math

import numpy as np
import pytest

from neurohybrid.evaluation.inference import bootstrap_interval, holm, paired_wilcoxon, row_rng, smallest_p


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate(method):
    """A skewed, non-negative metric (gamma, shape 4: like an HD95 or a volume error) on 20 subjects:
    the 95% interval of the mean holds the true mean in about 95% of simulated cohorts. (Bootstrap
    intervals run a little short at small n: measured 0.90-0.93 at n = 12 for these methods.)"""
    rng = np.random.default_rng(11)
    trials, hits = 300, 0
    for _ in range(trials):
        x = rng.gamma(4.0, 2.0, size=20)  # true mean 8
        lo, hi, used, note = bootstrap_interval(x, confidence=0.95, method=method, resamples=999, rng=rng)
        assert used == method and note == ""
        hits += lo <= 8.0 <= hi
    assert 0.90 <= hits / trials <= 0.985


def test_bootstrap_interval_respects_the_data_range():
    """Unlike a t interval on a few skewed non-negative values, the bound is never negative."""
    x = np.array([0.5, 0.7, 1.0, 45.0])  # one large HD95
    lo, hi, _, _ = bootstrap_interval(x, rng=np.random.default_rng(0))
    assert 0.0 <= lo <= np.mean(x) <= hi <= x.max()


def test_bootstrap_interval_degenerate_samples_give_nan_and_a_reason():
    for values, fragment in (([], "n = 0"), ([1.0, np.nan, 2.0], "n = 2 < 3"), ([2.0] * 5, "all values equal")):
        lo, hi, used, note = bootstrap_interval(values, rng=np.random.default_rng(0))
        assert math.isnan(lo) and math.isnan(hi) and used == "" and fragment in note


def test_bootstrap_median_falls_back_to_percentile_where_bca_is_undefined():
    """Every jackknife median of [1, 2, 2, 2, 3] is 2: BCa's acceleration is 0/0. The percentile
    interval comes back instead, and the method and note say so."""
    lo, hi, used, note = bootstrap_interval([1.0, 2.0, 2.0, 2.0, 3.0], np.median, rng=np.random.default_rng(0))
    assert used == "percentile" and "BCa undefined" in note
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    lo, hi, used, note = bootstrap_interval([0.0, 0.0, 0.0, 1.0, 1.0], np.median, rng=np.random.default_rng(0))
    assert used == "bca" and note == "" and 0.0 <= lo <= hi <= 1.0


def test_bootstrap_is_reproducible_per_row():
    x = np.random.default_rng(3).normal(size=10)
    a = bootstrap_interval(x, rng=row_rng(7, "glioma", "ude", "dice_flair"))
    b = bootstrap_interval(x, rng=row_rng(7, "glioma", "ude", "dice_flair"))
    c = bootstrap_interval(x, rng=row_rng(8, "glioma", "ude", "dice_flair"))
    assert a == b and a != c


def test_wilcoxon_known_effect_exact_p():
    d = -(1.0 + 0.01 * np.arange(8))  # all 8 differences negative, distinct magnitudes
    res = paired_wilcoxon(d, np.zeros(8))
    assert res["n"] == 8 and res["statistic"] == 0.0
    assert res["p_value"] == pytest.approx(2 / 2 ** 8)  # exact two-sided: only the all-negative sign pattern
    assert res["p_min"] == pytest.approx(2 / 2 ** 8) == smallest_p(8)
    assert res["median_difference"] == pytest.approx(np.median(d))
    assert res["note"] == ""


def test_smallest_p_is_attained_with_ties_too():
    """With tied magnitudes scipy uses an exhaustive permutation test up to 13 pairs; the
    all-same-sign pattern still gives 2 / 2^n."""
    res = paired_wilcoxon(np.ones(6), np.zeros(6))
    assert res["p_value"] == pytest.approx(smallest_p(6)) == pytest.approx(2 / 64)
    assert smallest_p(4) == 0.125 and smallest_p(0) == 1.0


def test_wilcoxon_degenerate_cases():
    zero = paired_wilcoxon([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert math.isnan(zero["p_value"]) and zero["note"] == "all differences zero" and zero["p_min"] == 1.0
    none = paired_wilcoxon([np.nan], [1.0])
    assert none["n"] == 0 and math.isnan(none["statistic"]) and none["note"] == "no paired subjects"
    few = paired_wilcoxon([1.0, 2.0, 3.5], [0.0, 0.0, 0.0])
    assert few["p_value"] == pytest.approx(0.25) == few["p_min"]


def test_holm_by_hand():
    p = holm([0.01, 0.04, np.nan, 0.03])
    assert p[0] == pytest.approx(0.03) and p[3] == pytest.approx(0.06) and p[1] == pytest.approx(0.06)
    assert math.isnan(p[2])
    # the untestable comparison still counts in a pre-registered family of 4
    q = holm([0.01, 0.04, np.nan, 0.03], family_size=4)
    assert q[0] == pytest.approx(0.04) and q[3] == pytest.approx(0.09) and q[1] == pytest.approx(0.09)
    with pytest.raises(ValueError):
        holm([0.01, 0.02], family_size=1)
