"""How many subjects per disorder a confirmatory study needs: a sample-size note from the paired
differences a cohort measured on its primary comparisons.

Noether's (1987) normal approximation for the two-sided Wilcoxon signed-rank test:

    n = (z_{1 - alpha/2} + z_{power})^2 / (3 (p' - 1/2)^2),   p' = P(D + D' > 0),

with D, D' two independent paired differences; p' is estimated from the measured differences by
the share of pairs i < j with d_i + d_j > 0 (ties count one half). alpha is the level of one test
at the first step of Holm's procedure, alpha / m for m planned comparisons: the strictest step,
so the number is enough for the comparison with the smallest p. It is at least the smallest n at
which the exact test can reach that level at all (2 / 2^n <= alpha / m).

This is a planning figure: p' measured on a handful of subjects is itself uncertain (a small
cohort where all differences share a sign gives p' = 1 and the smallest n the formula allows),
and Noether's approximation is conservative for large effects. A test checks it against the
simulated power of scipy's Wilcoxon test.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def walsh_probability(differences) -> float:
    """p' = P(D + D' > 0) from the finite differences: pairs i < j, ties counted one half; NaN
    with fewer than 2 differences."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return math.nan
    i, j = np.triu_indices(d.size, k=1)
    s = d[i] + d[j]
    return float((np.count_nonzero(s > 0) + 0.5 * np.count_nonzero(s == 0)) / s.size)


def attainable_n(alpha: float) -> int:
    """The smallest n whose exact two-sided signed-rank test can give p <= alpha (2 / 2^n <= alpha)."""
    return int(math.ceil(math.log2(2.0 / alpha) - 1e-12))


def subjects_needed(differences, alpha: float, power: float = 0.8) -> tuple[float, float, str]:
    """(n subjects for ``power`` at level ``alpha``, p', note) by Noether's approximation.

    n is NaN with a note when the measured differences show no direction (p' = 1/2) or are too few.
    """
    p = walsh_probability(differences)
    if not np.isfinite(p):
        return math.nan, p, "fewer than 2 paired differences"
    if p == 0.5:
        return math.nan, p, "no direction in the measured differences (p' = 0.5)"
    z = stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)
    n = z * z / (3.0 * (p - 0.5) ** 2)
    note = "all measured Walsh averages share a sign (p' at its bound): a floor, not an estimate" if p in (0.0, 1.0) else ""
    return float(max(math.ceil(n), attainable_n(alpha))), p, note
