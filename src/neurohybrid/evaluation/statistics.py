"""Cohort-level tables: the per-subject metrics concatenated, a summary of every metric (mean,
bootstrap interval, n used and n missing with the reasons), the pre-registered primary comparisons
(paired Wilcoxon, Holm, median paired difference with its bootstrap interval) and a sample-size
note. What is tested and how is the analysis plan (evaluation.analysis, config ``analysis:``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError
from neurohybrid.evaluation import analysis
from neurohybrid.evaluation.inference import bootstrap_interval, holm, paired_wilcoxon, row_rng
from neurohybrid.evaluation.power import subjects_needed
from neurohybrid.evaluation.scoring import COLUMNS, REASON, TABLE_COLUMNS, TREATED
from neurohybrid.registry import BASELINES, FAMILY_NAMES


def read_metrics(path: str | Path) -> pd.DataFrame:
    """One tidy metrics TSV, checked: the five columns, numeric values (n/a allowed), and the
    reason of each n/a (``missing_reason``; empty when a table predates it)."""
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
    if REASON not in frame.columns:
        frame[REASON] = ""
    frame[REASON] = frame[REASON].fillna("").astype(str)
    if TREATED not in frame.columns:  # a table from before treatments were recorded: nobody treated
        frame[TREATED] = 0
    treated = pd.to_numeric(frame[TREATED], errors="coerce")
    if not treated.isin([0, 1]).all():
        row = int(np.flatnonzero(~treated.isin([0, 1]).to_numpy())[0])
        raise InputError(f"'{TREATED}' must be 0 or 1, got {frame[TREATED].iloc[row]!r} in row {row + 2}", file=path)
    frame[TREATED] = treated.astype(int)
    if frame.empty:
        return frame[TABLE_COLUMNS]
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = values.isna() & frame["value"].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"non-numeric value {frame['value'].iloc[row]!r} in row {row + 2}", file=path)
    for col in ("subject", "disorder", "model", "metric"):
        if frame[col].isna().any():
            row = int(np.flatnonzero(frame[col].isna().to_numpy())[0])
            raise InputError(f"empty '{col}' in row {row + 2}", file=path)
    frame = frame[TABLE_COLUMNS].copy()
    frame["value"] = values.astype(float)
    frame["subject"] = frame["subject"].astype(str)
    return frame


def collect_metrics(paths) -> pd.DataFrame:
    """Concatenate metrics TSVs; duplicated (subject, model, metric) rows are an error."""
    frames = [read_metrics(p) for p in paths]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)
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
        reason = "" if np.isfinite(value) else ("no-change RMSE is 0" if r == 0 else "model or no-change RMSE missing")
        rows.append((rec.subject, rec.disorder, rec.model, ratio, value, reason, getattr(rec, TREATED, 0)))
    if not rows:
        return frame
    return pd.concat([frame, pd.DataFrame(rows, columns=TABLE_COLUMNS)], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# missing values: counted per row with their reasons, never dropped silently

NO_ROW = "no row (forecast or evaluation missing)"


def _values_by_subject(grp: pd.DataFrame, subjects) -> tuple[np.ndarray, list[str]]:
    """Values in ``subjects`` order (NaN where absent) and each missing subject's reason."""
    by = grp.set_index("subject")
    values = np.array([by.at[s, "value"] if s in by.index else math.nan for s in subjects], dtype=float)
    reasons = []
    for s, v in zip(subjects, values):
        if not np.isfinite(v):
            reasons.append((by.at[s, REASON] or "n/a without a reason") if s in by.index else NO_ROW)
        else:
            reasons.append("")
    return values, reasons


def count_reasons(reasons) -> str:
    """'2 × empty forecast mask; 1 × no row ...' for the non-empty reasons, most frequent first."""
    counts = pd.Series([r for r in reasons if r], dtype=object).value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # ties alphabetically: reproducible
    return "; ".join(f"{n} × {reason}" for reason, n in ordered)


def _model_order(models) -> list[str]:
    present = set(models)
    return [m for m in FAMILY_NAMES if m in present] + sorted(present - set(FAMILY_NAMES))


# ---------------------------------------------------------------------------------------------
# summary: every metric (primary and secondary), estimate and bootstrap interval, no tests

SUMMARY_COLUMNS = ["disorder", "model", "metric", "role", "n", "n_missing", "missing_reasons", "mean", "ci_low",
                   "ci_high", "median", "ci_method", "ci_level", "note", "patients"]


def summarise(frame: pd.DataFrame, plan: analysis.Plan | None = None) -> pd.DataFrame:
    """Per (disorder, model, metric): n finite values, n missing with reasons (every subject of the
    disorder is expected), mean and a bootstrap interval of the mean, median. ``patients``: "all";
    a disorder with treated patients (``treated`` column) also gets the same rows over its
    "treated" and its "untreated" patients alone."""
    plan = plan or analysis.plan({})
    rows = []
    if TREATED not in frame.columns:
        frame = frame.assign(**{TREATED: 0})
    for disorder, dgrp in frame.groupby("disorder", sort=True):
        subjects = sorted(dgrp["subject"].unique())
        treated = set(dgrp.loc[dgrp[TREATED] == 1, "subject"])
        groups = [("all", subjects)]
        if treated:
            groups += [("treated", [s for s in subjects if s in treated]), ("untreated", [s for s in subjects if s not in treated])]
        for patients, members in groups:
            for (model, metric), grp in dgrp.groupby(["model", "metric"], sort=True):
                values, reasons = _values_by_subject(grp, members)
                x = values[np.isfinite(values)]
                # the "all" rows keep their own random stream (same intervals as before the split existed)
                key = ("summary", disorder, model, metric) + (() if patients == "all" else (patients,))
                lo, hi, how, note = bootstrap_interval(
                    x, np.mean, confidence=plan.confidence, method=plan.interval, resamples=plan.resamples,
                    rng=row_rng(plan.seed, *key))
                role = "primary" if plan.primary(disorder) == metric else "secondary"
                rows.append((disorder, model, metric, role, int(x.size), int(values.size - x.size), count_reasons(reasons),
                             float(x.mean()) if x.size else math.nan, lo, hi,
                             float(np.median(x)) if x.size else math.nan, how, plan.confidence, note, patients))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ---------------------------------------------------------------------------------------------
# primary comparisons: every family vs every baseline, the baselines vs each other

STATS_COLUMNS = ["disorder", "metric", "model", "baseline", "comparison", "n", "n_missing", "missing_reasons",
                 "statistic", "p_value", "p_min", "holm_family", "holm_m", "p_holm", "significant",
                 "median_difference", "ci_low", "ci_high", "ci_method", "favours", "note"]


def comparisons(models, baselines=BASELINES) -> list[tuple[str, str, str]]:
    """(model, baseline, kind) of the planned comparisons among ``models``: each non-baseline family
    against each baseline, then each baseline against the baselines before it in the registry's
    order (mechanistic vs persistence, data_driven vs persistence, data_driven vs mechanistic)."""
    order = _model_order(models)
    present = [b for b in baselines if b in order]
    out = [(m, b, "family vs baseline") for m in order if m not in baselines for b in present]
    out += [(later, earlier, "baseline vs baseline") for i, earlier in enumerate(present) for later in present[i + 1:]]
    return out


def primary_pairs(frame: pd.DataFrame, plan: analysis.Plan, baselines=BASELINES):
    """Yield (disorder, metric, model, baseline, kind, a, b, missing reasons) per planned comparison:
    a and b are the two families' primary metric over every subject of the disorder. The families
    are the plan's (the config's models.families) and any other in the table."""
    for disorder, dgrp in frame.groupby("disorder", sort=True):
        metric = plan.primary(disorder)
        if metric is None:
            continue
        subjects = sorted(dgrp["subject"].unique())
        rows = dgrp[dgrp["metric"] == metric]
        values = {m: _values_by_subject(g, subjects) for m, g in rows.groupby("model", sort=True)}
        for m in plan.families:  # planned but without a single row: every subject missing
            values.setdefault(m, (np.full(len(subjects), math.nan), [NO_ROW] * len(subjects)))
        for model, base, kind in comparisons(values, baselines):
            (a, ra), (b, rb) = values[model], values[base]
            reasons = [" & ".join(f"{name}: {r}" for name, r in ((model, x), (base, y)) if r) for x, y in zip(ra, rb)]
            yield disorder, metric, model, base, kind, a, b, reasons


def _favours(median: float, metric: str, model: str, base: str) -> str:
    sign = np.sign(median) * analysis.direction(metric) if np.isfinite(median) else 0
    return model if sign > 0 else base if sign < 0 else ""


def paired_tests(frame: pd.DataFrame, plan: analysis.Plan | None = None, baselines=BASELINES) -> pd.DataFrame:
    """The primary comparisons of the plan: a two-sided paired Wilcoxon signed-rank test of the
    difference model - baseline, Holm-adjusted over the planned primary comparisons of each
    disorder (``holm_scope: disorder``) or of all disorders (``all``), and the median paired
    difference with its bootstrap interval. Secondary metrics are not tested (see ``summarise``).

    A negative median difference means the model's value is lower; ``favours`` names the better
    family by the metric's direction. A comparison whose test is undefined (every difference
    zero) keeps its place in the Holm family, as if its p were 1.
    """
    plan = plan or analysis.plan({})
    rows = []
    for disorder, metric, model, base, kind, a, b, reasons in primary_pairs(frame, plan, baselines):
        res = paired_wilcoxon(a, b)
        ok = np.isfinite(a) & np.isfinite(b)
        lo, hi, how, why = bootstrap_interval(
            a[ok] - b[ok], np.median, confidence=plan.confidence, method=plan.interval, resamples=plan.resamples,
            rng=row_rng(plan.seed, "paired", disorder, metric, model, base))
        notes = [n for n in (res["note"], why and f"interval: {why}") if n]
        rows.append({"disorder": disorder, "metric": metric, "model": model, "baseline": base, "comparison": kind,
                     "n": res["n"], "n_missing": int(a.size - res["n"]), "missing_reasons": count_reasons(reasons),
                     "statistic": res["statistic"], "p_value": res["p_value"], "p_min": res["p_min"],
                     "holm_family": disorder if plan.holm_scope == "disorder" else "all",
                     "median_difference": res["median_difference"], "ci_low": lo, "ci_high": hi, "ci_method": how,
                     "favours": _favours(res["median_difference"], metric, model, base), "note": "; ".join(notes)})
    out = pd.DataFrame(rows, columns=STATS_COLUMNS)
    for _, idx in out.groupby("holm_family", sort=False).groups.items():
        m = len(idx)
        out.loc[idx, "holm_m"] = m
        out.loc[idx, "p_holm"] = holm(out.loc[idx, "p_value"].to_numpy(dtype=float), family_size=m)
        # the smallest p a comparison could reach after Holm, for readers of a table of non-significant results
        floor = np.minimum(1.0, m * out.loc[idx, "p_min"].to_numpy(dtype=float))
        unreachable = floor > plan.alpha
        for i, flag, f in zip(idx, unreachable, floor):
            if flag:
                extra = f"cannot reach alpha {plan.alpha:g} after Holm: p >= {out.at[i, 'p_min']:.3g}, x {m} comparisons = {f:.3g}"
                out.at[i, "note"] = "; ".join(n for n in (out.at[i, "note"], extra) if n)
    out["holm_m"] = out["holm_m"].astype("Int64") if not out.empty else out["holm_m"]
    out["significant"] = out["p_holm"].astype(float) < plan.alpha
    return out


def read_stats(path: str | Path) -> pd.DataFrame:
    """stats.tsv as written by ``paired_tests`` (checked: its columns)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        frame = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=True,
                            dtype={c: str for c in ("disorder", "metric", "model", "baseline", "comparison")})
    except Exception as exc:
        raise InputError(f"cannot read table ({type(exc).__name__}: {exc})", file=path) from None
    missing = [c for c in STATS_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)} (not written by this version of 'cohort stats'?)",
                         file=path)
    frame["significant"] = frame["significant"].astype(str).str.lower() == "true"
    return frame


# ---------------------------------------------------------------------------------------------
# sample-size note

POWER_COLUMNS = ["disorder", "metric", "model", "baseline", "comparison", "n", "median_difference", "walsh_p",
                 "alpha_per_test", "power", "n_required", "note"]


def power_table(frame: pd.DataFrame, plan: analysis.Plan | None = None, baselines=BASELINES) -> pd.DataFrame:
    """Subjects per disorder a confirmatory study needs for ``plan.power`` on each primary
    comparison, from the measured paired differences (``power.subjects_needed``), at the level of
    one test at Holm's first step: alpha / m with m the comparison's Holm family size."""
    plan = plan or analysis.plan({})
    pairs = list(primary_pairs(frame, plan, baselines))
    sizes: dict[str, int] = {}
    for p in pairs:
        key = p[0] if plan.holm_scope == "disorder" else "all"
        sizes[key] = sizes.get(key, 0) + 1
    rows = []
    for disorder, metric, model, base, kind, a, b, _ in pairs:
        ok = np.isfinite(a) & np.isfinite(b)
        d = a[ok] - b[ok]
        level = plan.alpha / sizes[disorder if plan.holm_scope == "disorder" else "all"]
        n_req, walsh, note = subjects_needed(d, level, plan.power)
        rows.append((disorder, metric, model, base, kind, int(d.size), float(np.median(d)) if d.size else math.nan,
                     walsh, level, plan.power, n_req, note))
    out = pd.DataFrame(rows, columns=POWER_COLUMNS)
    out["n_required"] = out["n_required"].astype("Int64")  # a count (NaN where no direction was measured)
    return out
