"""The statistical building blocks of the cohort analysis: bootstrap intervals, the paired
Wilcoxon signed-rank test, its smallest attainable p, and Holm's step-down adjustment.

Each returns a reason instead of raising when a sample cannot give an answer (too few values,
no variability): a cohort table must still be written when one comparison is undefined.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
from scipy import stats

MIN_BOOTSTRAP_N = 3  # with 2 values a bootstrap has 3 distinct resamples: no interval worth printing


def row_rng(seed: int, *key) -> np.random.Generator:
    """A generator seeded by the run's seed and the row's identity (disorder, model, metric, ...),
    so a row's interval neither depends on which other rows the table holds nor on their order."""
    tag = zlib.crc32("\t".join(map(str, key)).encode())
    return np.random.default_rng([int(seed), tag])


def bootstrap_interval(values, statistic=np.mean, *, confidence: float = 0.95, method: str = "bca",
                       resamples: int = 9999, rng=None) -> tuple[float, float, str, str]:
    """(low, high, method used, note) of a bootstrap interval of ``statistic`` over the finite values.

    NaN bounds with a note when there are fewer than 3 values or all are equal (a bootstrap of a
    constant has no spread: the interval would claim a certainty the sample does not have). When
    BCa is undefined for a sample (its jackknife has no spread, e.g. the median of a few values
    with ties), the percentile interval is given and the method says so.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < MIN_BOOTSTRAP_N:
        return math.nan, math.nan, "", f"n = {x.size} < {MIN_BOOTSTRAP_N}: no interval"
    if np.ptp(x) == 0:
        return math.nan, math.nan, "", "all values equal: no interval"
    rng = rng if rng is not None else np.random.default_rng(0)
    kwargs = dict(confidence_level=confidence, n_resamples=int(resamples), vectorized=True, axis=-1)

    def run(how, generator):
        with warnings.catch_warnings():
            # scipy warns (and returns NaN) for degenerate BCa; the fallback below handles it
            warnings.simplefilter("ignore")
            res = stats.bootstrap((x,), statistic, method=how, rng=generator, **kwargs)
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    state = rng.bit_generator.state  # the fallback draws the same resamples
    lo, hi = run("BCa" if method == "bca" else "percentile", rng)
    if method == "bca" and not (np.isfinite(lo) and np.isfinite(hi)):
        rng.bit_generator.state = state
        lo, hi = run("percentile", rng)
        return lo, hi, "percentile", "BCa undefined for this sample: percentile interval"
    return lo, hi, method, ""


def smallest_p(n_nonzero: int) -> float:
    """The smallest two-sided p a signed-rank test can give with n nonzero paired differences:
    under the null every sign pattern has probability 2^-n, and the two most extreme (all
    positive, all negative) give p = 2 / 2^n. Holds for the exact and permutation p-values scipy
    computes up to 50 pairs; beyond, the normal approximation, which is far below any alpha."""
    return 1.0 if n_nonzero <= 0 else min(1.0, 2.0 / 2.0 ** n_nonzero)


def paired_wilcoxon(a, b) -> dict:
    """Two-sided Wilcoxon signed-rank test of the paired differences a - b (finite pairs only;
    zero differences dropped, scipy's "wilcox").

    Returns n, statistic, p_value, p_min (``smallest_p``), median_difference and a note; NaN
    statistic and p with a note when the test is undefined (no pairs, every difference zero).
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    n_nonzero = int(np.count_nonzero(d))
    out = {"n": int(d.size), "statistic": math.nan, "p_value": math.nan, "p_min": smallest_p(n_nonzero),
           "median_difference": float(np.median(d)) if d.size else math.nan, "note": ""}
    if d.size == 0:
        out["note"] = "no paired subjects"
    elif n_nonzero == 0:
        out["note"] = "all differences zero"
    else:
        res = stats.wilcoxon(d, zero_method="wilcox")
        out["statistic"] = float(res.statistic)
        out["p_value"] = float(res.pvalue)
    return out


def holm(pvalues, family_size: int | None = None) -> np.ndarray:
    """Holm step-down adjusted p-values.

    NaN entries (untestable comparisons) stay NaN. ``family_size`` (default: the number of finite
    p-values) is the number of planned comparisons: a planned comparison that could not be tested
    still counts, as if its p were 1, so the adjustment does not shrink after seeing the data.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if idx.size == 0:
        return out
    m = idx.size if family_size is None else int(family_size)
    if m < idx.size:
        raise ValueError(f"family_size {m} is smaller than the number of p-values {idx.size}")
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
