"""The cohort's treatment tables and figures (``neurohybrid plan cohort``, results/cohort/).

Tables are tidy, one row per subject x model x measure with its unit: the per-subject planning
tables concatenated; for glioma also the coverage of every radiotherapy target by the held-out
tumour (rows ``ctv_coverage_flair`` / ``ctv_coverage_t1gd`` of the metrics table, where the
evaluation step computed them). Figures: glioma coverage per family against the standard margin
(each subject a line); stroke and Alzheimer's one panel per patient (infarct volume against
reperfusion time; meta-region tau with and without the trial).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError
from neurohybrid.io.tsv import read_table
from neurohybrid.planning import ROW_COLUMNS

COVERAGE_UNIT = "fraction of the held-out tumour inside the target"


def _subject_files(plan_dirs, suffix: str) -> list[Path]:
    out = []
    for d in plan_dirs:
        d = Path(d)
        if not d.is_dir():
            raise InputError("planning folder not found", file=d)
        out += sorted(d.glob(f"sub-*_{suffix}"))
    return out


def collect(disorder: str, plan_dirs, metrics: str | Path | None = None) -> pd.DataFrame:
    paths = _subject_files(plan_dirs, "desc-plan.tsv")
    if not paths:
        raise InputError(f"no {disorder} planning table (sub-*_desc-plan.tsv) in the given folders")
    frames = [read_table(p, required=ROW_COLUMNS) for p in paths]
    table = pd.concat(frames, ignore_index=True)
    table = table[table["disorder"] == disorder]
    if metrics is not None and disorder == "glioma":
        m = read_table(metrics, required=["subject", "disorder", "model", "metric", "value"])
        cov = m[(m["disorder"] == "glioma") & m["metric"].astype(str).str.startswith("ctv_coverage_")]
        cov = cov.rename(columns={"metric": "measure"})[["subject", "disorder", "model", "measure", "value"]].copy()
        cov["unit"] = COVERAGE_UNIT
        table = pd.concat([table, cov], ignore_index=True)
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    return table.sort_values(["subject", "model", "measure"], kind="stable").reset_index(drop=True)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    from neurohybrid.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()


def figure_glioma(table: pd.DataFrame, path) -> None:
    from neurohybrid.registry import FAMILY_NAMES

    cov = table[table["measure"].astype(str).str.startswith("ctv_coverage_")]
    models = ["standard_margin"] + [f for f in FAMILY_NAMES if f in set(cov["model"])]
    fig, axes = _grid(2)
    fig.set_size_inches(9, 4.2)
    for ax, tag in zip(axes, ("flair", "t1gd")):
        sub = cov[cov["measure"] == f"ctv_coverage_{tag}"].pivot_table(index="subject", columns="model", values="value")
        sub = sub[[m for m in models if m in sub.columns]]
        x = np.arange(sub.shape[1])
        for _, row in sub.iterrows():
            ax.plot(x, row.to_numpy(), "-o", color="0.5", alpha=0.6, ms=3)
        ax.plot(x, sub.median().to_numpy(), "s", color="C3", label="median")
        ax.set_xticks(x, ["standard margin" if m == "standard_margin" else m for m in sub.columns],
                      rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"held-out {tag.upper() if tag == 'flair' else 'T1Gd'} inside target")
        ax.set_title("coverage at equal volume", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path)


def figure_stroke(plan_dirs, path) -> None:
    curves = _subject_files(plan_dirs, "desc-reperfusion_curve.tsv")
    fig, axes = _grid(len(curves))
    for ax, p in zip(axes, curves):
        c = read_table(p, required=["subject", "model", "reperfusion_h", "volume_ml"])
        for k, (model, g) in enumerate(c.groupby("model", sort=False)):
            t = pd.to_numeric(g["reperfusion_h"], errors="coerce")
            at, never = g[t.notna()], g[t.isna()]
            ax.plot(t[t.notna()], at["volume_ml"], "-", color=f"C{k}", label=model)
            lo, hi = (pd.to_numeric(at[col], errors="coerce") for col in ("volume_ml_low", "volume_ml_high"))
            if lo.notna().all() and hi.notna().all():
                ax.fill_between(t[t.notna()], lo, hi, color=f"C{k}", alpha=0.2)
            if not never.empty:
                ax.axhline(float(never["volume_ml"].iloc[0]), color=f"C{k}", ls="--", lw=1)
        ax.set_title(f"sub-{c['subject'].iloc[0]}", fontsize=9)
        ax.set_xlabel("onset to reperfusion (h)", fontsize=8)
        ax.set_ylabel("final infarct (ml)", fontsize=8)
        ax.legend(fontsize=6)
    _save(fig, path)


def figure_alzheimer(plan_dirs, path) -> None:
    """One panel per patient: the meta-region mean SUVR after the last visit without (solid) and
    with the trial (dashed) per family, the parameter band, and the positivity threshold."""
    curves = _subject_files(plan_dirs, "desc-metaregion_curve.tsv")
    fig, axes = _grid(len(curves))
    for ax, p in zip(axes, curves):
        c = read_table(p, required=["subject", "model", "years_after_last_visit", "suvr", "suvr_trial", "positivity_suvr"])
        for k, (model, g) in enumerate(c.groupby("model", sort=False)):
            t = g["years_after_last_visit"]
            ax.plot(t, g["suvr"], "-", color=f"C{k}", label=model)
            ax.plot(t, g["suvr_trial"], "--", color=f"C{k}", label=f"{model}, trial")
            lo, hi = (pd.to_numeric(g[col], errors="coerce") for col in ("suvr_low", "suvr_high"))
            if lo.notna().all() and hi.notna().all():
                ax.fill_between(t, lo, hi, color=f"C{k}", alpha=0.15)
        ax.axhline(float(c["positivity_suvr"].iloc[0]), color="k", ls=":", lw=1)
        ax.set_title(f"sub-{c['subject'].iloc[0]}", fontsize=9)
        ax.set_xlabel("years after the last visit", fontsize=8)
        ax.set_ylabel("meta-region SUVR", fontsize=8)
        ax.legend(fontsize=6)
    _save(fig, path)
