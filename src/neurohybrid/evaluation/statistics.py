"""Cohort-level tables: concatenation of per-subject metrics, summaries with 95% CIs, and
paired Wilcoxon signed-rank tests of each hybrid family against each baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from neurohybrid.errors import InputError
from neurohybrid.evaluation.scoring import COLUMNS
from neurohybrid.registry import BASELINES


def read_metrics(path: str | Path) -> pd.DataFrame:
    """One tidy metrics TSV, checked: the five columns, numeric values (n/a allowed)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        # identifiers stay text: subject '01' must not become 1
        frame = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=True,
                            dtype={c: str for c in ("subject", "disorder", "model", "metric")})
    except Exception as exc:
        raise InputError(f"cannot read table ({type(exc).__name__}: {exc})", file=path) from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}", file=path)
    if frame.empty:
        return frame[COLUMNS]
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = values.isna() & frame["value"].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"non-numeric value {frame['value'].iloc[row]!r} in row {row + 2}", file=path)
    for col in ("subject", "disorder", "model", "metric"):
        if frame[col].isna().any():
            row = int(np.flatnonzero(frame[col].isna().to_numpy())[0])
            raise InputError(f"empty '{col}' in row {row + 2}", file=path)
    frame = frame[COLUMNS].copy()
    frame["value"] = values.astype(float)
    frame["subject"] = frame["subject"].astype(str)
    return frame


def collect_metrics(paths) -> pd.DataFrame:
    """Concatenate metrics TSVs; duplicated (subject, model, metric) rows are an error."""
    frames = [read_metrics(p) for p in paths]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    key = ["subject", "disorder", "model", "metric"]
    dup = frame.duplicated(key, keep=False)
    if dup.any():
        first = frame.loc[dup].iloc[0]
        raise InputError(f"metric '{first['metric']}' of model '{first['model']}' appears in more than one row/file",
                         subject=first["subject"])
    frame = add_persistence_ratios(frame)
    return frame.sort_values(key, kind="stable").reset_index(drop=True)


def add_persistence_ratios(frame: pd.DataFrame, metric: str = "rmse_suvr", ratio: str = "rmse_rel_persistence") -> pd.DataFrame:
    """Add ``ratio`` = model metric / "no change" metric for subjects whose rows lack it.

    Per-subject evaluation computes the ratio only when the persistence forecast lay beside
    the model's; here the persistence rows of the same subject provide it instead.
    """
    base = frame[(frame["model"] == "persistence") & (frame["metric"] == metric)]
    if base.empty:
        return frame
    ref = base.set_index(["subject", "disorder"])["value"]
    have = set(map(tuple, frame.loc[frame["metric"] == ratio, ["subject", "disorder", "model"]].to_numpy()))
    rows = []
    for rec in frame[frame["metric"] == metric].itertuples(index=False):
        key = (rec.subject, rec.disorder)
        if (rec.subject, rec.disorder, rec.model) in have or key not in ref.index:
            continue
        r = ref.loc[key]
        value = rec.value / r if np.isfinite(r) and r != 0 else math.nan
        rows.append((rec.subject, rec.disorder, rec.model, ratio, value))
    if not rows:
        return frame
    return pd.concat([frame, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True)


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    mean = float(x.mean())
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    if sem == 0:
        return mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, df=x.size - 1)) * sem
    return mean - half, mean + half


def summarise(frame: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (disorder, model, metric): n finite values, mean, t-interval CI of the mean."""
    rows = []
    for (disorder, model, metric), grp in frame.groupby(["disorder", "model", "metric"], sort=True):
        x = grp["value"].to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        lo, hi = t_interval(x, level)
        rows.append((disorder, model, metric, int(x.size), float(x.mean()) if x.size else math.nan, lo, hi))
    return pd.DataFrame(rows, columns=["disorder", "model", "metric", "n", "mean", "ci95_low", "ci95_high"])


STATS_COLUMNS = ["disorder", "metric", "model", "baseline", "n", "statistic", "p_value", "p_holm",
                 "median_difference", "note"]


def paired_wilcoxon(a, b) -> dict:
    """Wilcoxon signed-rank test of paired samples a - b (finite pairs only).

    Returns n, statistic, p_value, median_difference and a note; NaN statistic and p with a
    note when the test is undefined (no pairs, or every difference zero).
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    out = {"n": int(d.size), "statistic": math.nan, "p_value": math.nan,
           "median_difference": float(np.median(d)) if d.size else math.nan, "note": ""}
    if d.size == 0:
        out["note"] = "no paired subjects"
    elif np.all(d == 0):
        out["note"] = "all differences zero"
    else:
        res = stats.wilcoxon(d, zero_method="wilcox")
        out["statistic"] = float(res.statistic)
        out["p_value"] = float(res.pvalue)
        n_nonzero = int(np.count_nonzero(d))
        # with n nonzero pairs the smallest two-sided exact p is 2 / 2**n: below 6 it cannot reach 0.05
        if n_nonzero < 6:
            out["note"] = f"only {n_nonzero} nonzero differences: p cannot fall below {2.0 / 2 ** n_nonzero:.3g}"
    return out


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN entries are left out and stay NaN)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if idx.size == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_tests(frame: pd.DataFrame, baselines=BASELINES) -> pd.DataFrame:
    """Each non-baseline (hybrid) model against each baseline, per disorder and metric.

    Subjects are paired on (subject, disorder); the difference is hybrid minus baseline, so
    a negative median difference means the hybrid's value is lower. Holm adjustment is over
    all tests of one disorder.
    """
    rows = []
    for disorder, dgrp in frame.groupby("disorder", sort=True):
        wide = dgrp.pivot_table(index=["subject", "metric"], columns="model", values="value", aggfunc="first")
        models = sorted(wide.columns)
        hybrids = [m for m in models if m not in baselines]
        present = [b for b in baselines if b in models]
        start = len(rows)
        for metric in sorted(dgrp["metric"].unique()):
            sub = wide.xs(metric, level="metric")
            for model in hybrids:
                for base in present:
                    res = paired_wilcoxon(sub[model].to_numpy(), sub[base].to_numpy())
                    rows.append({"disorder": disorder, "metric": metric, "model": model, "baseline": base, **res})
        adjusted = holm([r["p_value"] for r in rows[start:]])
        for r, p in zip(rows[start:], adjusted):
            r["p_holm"] = float(p)
    return pd.DataFrame(rows, columns=STATS_COLUMNS)
