"""Cohort figures (PNG, matplotlib's Agg backend): metric box plots, the primary comparisons'
effect sizes, forecast-vs-observed overlays, parameter recovery, SOL accuracy vs cost and the
training curves of every fold model.

Every figure file is always written, so a workflow can declare them as outputs; a figure
whose data the cohort lacks (no stroke subjects, no ground truth, no SOL model) says so in
its panel instead of being left out.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neurohybrid.errors import InputError  # noqa: E402
from neurohybrid.evaluation.analysis import direction  # noqa: E402
from neurohybrid.evaluation.recovery import recovered  # noqa: E402
from neurohybrid.evaluation.scoring import (forecast_path, load_forecast_mask, read_fit_json,  # noqa: E402
                                            read_regional_forecast, read_truth)
from neurohybrid.evaluation.targets import DISORDERS, read_target  # noqa: E402
from neurohybrid.registry import FAMILY_NAMES, LABELS  # noqa: E402
from neurohybrid.io import atomic_path  # noqa: E402

FIGURE_NAMES = (
    "boxplot_glioma.png", "boxplot_alzheimer.png", "boxplot_stroke.png",
    "overlay_glioma.png", "overlay_stroke.png", "scatter_alzheimer.png",
    "parameter_recovery.png", "sol_accuracy_cost.png", "training_curves.png", "primary_comparisons.png",
)

# the metrics each disorder's box plot shows, in this order (the pre-registered primary metric,
# read from stats.tsv when given, comes first and says so)
HEADLINE_METRICS = {
    "glioma": ["dice_t1gd", "dice_flair", "abs_volume_error_ml_t1gd", "abs_volume_error_ml_flair",
               "hd95_mm_t1gd", "hd95_mm_flair", "fit_seconds"],
    "alzheimer": ["rmse_suvr", "pearson_r", "rmse_rel_persistence", "fit_seconds"],
    "stroke": ["dice_infarct", "abs_volume_error_ml_infarct", "hd95_mm_infarct", "fit_seconds"],
}
MODEL_ORDER = list(FAMILY_NAMES)


def _models_in(frame: pd.DataFrame) -> list[str]:
    present = set(frame["model"])
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def _label(model: str) -> str:
    """The registry's display label (e.g. the SOL families are accelerated mechanistic models)."""
    return LABELS.get(model, model)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _no_data(path: Path, title: str, reason: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data: {reason}", ha="center", va="center", wrap=True)
    _save(fig, path)


def box_labels(models, data, n_subjects: int) -> list[str]:
    """Model names; a box drawn from fewer subjects says how many are missing (summary.tsv gives the reasons)."""
    return [_label(m) if len(v) == n_subjects else f"{_label(m)} ({n_subjects - len(v)} n/a)" for m, v in zip(models, data)]


def metric_boxplots(frame: pd.DataFrame, disorder: str, path: Path, primary: str | None = None) -> bool:
    """One panel per headline metric (the primary one first); one box (and the subjects as points) per model."""
    d = frame[frame["disorder"] == disorder]
    shown = ([primary] if primary else []) + [m for m in HEADLINE_METRICS[disorder] if m != primary]
    metrics = [m for m in shown if m in set(d["metric"])]
    if not metrics:
        _no_data(path, f"{disorder}: metrics", f"no {disorder} rows in the metrics table")
        return False
    # models with a row of these metrics (not e.g. the standard radiotherapy target, which has only coverage rows)
    models = _models_in(d[d["metric"].isin(metrics)])
    panel_w = max(2.0, 0.45 * len(models) + 1.0)
    fig, axes = plt.subplots(1, len(metrics), figsize=(panel_w * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        n_subjects = d["subject"].nunique()
        data = [d[(d["metric"] == metric) & (d["model"] == m)]["value"].dropna().to_numpy() for m in models]
        ax.boxplot(data, showfliers=False)
        for i, values in enumerate(data, start=1):
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.plot(i + jitter, values, "o", ms=3, alpha=0.6, color="k")
        ax.set_xticks(range(1, len(models) + 1), box_labels(models, data, n_subjects), rotation=60, ha="right", fontsize=7)
        title = metric.replace("_ml_", "_ml\n").replace("_mm_", "_mm\n")
        ax.set_title(title + ("\n(primary)" if metric == primary else ""), fontsize=7,
                     fontweight="bold" if metric == primary else "normal")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{disorder}: per-subject metrics (n = {d['subject'].nunique()} subjects)")
    fig.tight_layout()
    _save(fig, path)
    return True


def _composite(target_slice: np.ndarray, forecast_slice: np.ndarray) -> np.ndarray:
    """RGB: observed only red, forecast only green, both yellow."""
    rgb = np.zeros(target_slice.shape + (3,))
    rgb[..., 0] = target_slice
    rgb[..., 1] = forecast_slice
    return rgb


def mask_overlay(frame, disorder, forecasts_root, targets_root, path: Path) -> bool:
    """Axial slice through the largest cross-section of the observed lesion: each model's forecast vs observed."""
    keys = {"glioma": [("t1gd", "T1Gd"), ("flair", "FLAIR")], "stroke": [("infarct", "infarct")]}[disorder]
    d = frame[frame["disorder"] == disorder]
    subjects = sorted(d["subject"].unique())
    if not subjects or forecasts_root is None or targets_root is None:
        _no_data(path, f"{disorder}: forecast vs observed", f"no {disorder} subjects or no forecast/target folders")
        return False
    subject = subjects[0]
    target = read_target(targets_root, subject, disorder)
    models = _models_in(d[(d["subject"] == subject) & ~d["metric"].astype(str).str.startswith("ctv_coverage_")])
    # the slice where the observed masks together cover most voxels
    area = sum(target.arrays[k].sum(axis=(0, 1)) for k, _ in keys)
    z = int(np.argmax(area)) if area.any() else area.size // 2
    fig, axes = plt.subplots(len(keys), len(models), figsize=(2.2 * len(models), 2.4 * len(keys)), squeeze=False)
    for row, (key, desc) in enumerate(keys):
        for col, model in enumerate(models):
            ax = axes[row][col]
            ax.axis("off")
            fpath = forecast_path(Path(forecasts_root) / f"sub-{subject}", subject, model, f"desc-{desc}_mask.nii.gz")
            if not fpath.exists():
                ax.set_title(f"{model}\n(no forecast)", fontsize=7)
                continue
            pred = load_forecast_mask(fpath, target, key)
            ax.imshow(np.rot90(_composite(target.arrays[key][:, :, z], pred[:, :, z])), interpolation="nearest")
            ax.set_title(f"{model} {desc}", fontsize=7)
    fig.suptitle(f"sub-{subject}, slice z={z}: observed red, forecast green, both yellow", fontsize=9)
    _save(fig, path)
    return True


def alzheimer_scatter(frame, forecasts_root, targets_root, path: Path) -> bool:
    """Regional SUVR forecast vs observed at the last visit, pooled over subjects, one panel per model."""
    d = frame[frame["disorder"] == "alzheimer"]
    if d.empty or forecasts_root is None or targets_root is None:
        _no_data(path, "alzheimer: regional forecast vs observed", "no alzheimer subjects or no forecast/target folders")
        return False
    models = _models_in(d)
    fig, axes = plt.subplots(1, len(models), figsize=(2.6 * len(models), 2.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        xs, ys = [], []
        for subject in sorted(d[d["model"] == model]["subject"].unique()):
            target = read_target(targets_root, subject, "alzheimer")
            fpath = forecast_path(Path(forecasts_root) / f"sub-{subject}", subject, model, "pet.tsv")
            if fpath.exists():
                xs.append(target.arrays["suvr"])
                ys.append(read_regional_forecast(fpath, subject, [str(r) for r in target.meta["regions"]]))
        if xs:
            x, y = np.concatenate(xs), np.concatenate(ys)
            ax.plot(x, y, ".", ms=2, alpha=0.5)
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{model} ({len(xs)} subj.)", fontsize=8)
        ax.set_xlabel("observed SUVR", fontsize=7)
    axes[0][0].set_ylabel("forecast SUVR", fontsize=7)
    _save(fig, path)
    return True


def parameter_recovery(frame, forecasts_root, truth_root, path: Path, max_panels: int = 8, targets_root=None) -> bool:
    """Estimated vs true parameter, one panel per scored parameter (evaluation.recovery: fitted,
    identifiable, same units as the truth), colour per model; a subject whose value is not scored
    (e.g. stroke sigma from a prior) is left out, as in the metrics table."""
    if forecasts_root is None or truth_root is None:
        _no_data(path, "parameter recovery", "no ground-truth folder given")
        return False
    points: dict[str, list[tuple[str, float, float]]] = {}
    # models with a forecast (not the standard radiotherapy target, which has only coverage rows)
    fitted = frame[~frame["metric"].astype(str).str.startswith("ctv_coverage_")]
    for (subject, disorder, model), _ in fitted.groupby(["subject", "disorder", "model"]):
        truth = read_truth(truth_root, subject)
        if not truth:
            continue
        fit = read_fit_json(Path(forecasts_root) / f"sub-{subject}", subject, model)
        meta = _target_meta(targets_root, subject, disorder)
        for name, (est, tru, reason) in recovered(disorder, fit, truth, meta).items():
            if not reason:
                points.setdefault(f"{disorder}: {name}", []).append((model, tru, est))
    if not points:
        _no_data(path, "parameter recovery", "no fitted parameter matches a ground-truth value")
        return False
    names = sorted(points)[:max_panels]
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = pd.DataFrame(points[name], columns=["model", "truth", "estimate"])
        for model, grp in pts.groupby("model"):
            ax.plot(grp["truth"], grp["estimate"], "o", ms=4, label=model)
        lo = float(min(pts["truth"].min(), pts["estimate"].min()))
        hi = float(max(pts["truth"].max(), pts["estimate"].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("true", fontsize=7)
    axes[0][0].set_ylabel("estimated", fontsize=7)
    axes[0][-1].legend(fontsize=6)
    _save(fig, path)
    return True


def _target_meta(targets_root, subject: str, disorder: str) -> dict:
    """The target's metadata (Alzheimer's connectome source decides whether kappa is scored)."""
    if targets_root is None:
        return {}
    try:
        return read_target(targets_root, subject, disorder).meta
    except InputError:
        return {}


def primary_comparisons(stats: pd.DataFrame | None, path: Path) -> bool:
    """One panel per disorder: the median paired difference (model - baseline) of the primary
    metric with its bootstrap interval, one row per planned comparison; filled markers where the
    Holm-adjusted p is below the plan's alpha (stats.tsv ``significant``)."""
    if stats is None or stats.empty:
        _no_data(path, "primary comparisons", "no stats table (neurohybrid cohort stats) or no primary comparison")
        return False
    disorders = [d for d in DISORDERS if d in set(stats["disorder"])]
    heights = [max(2.0, 0.22 * int((stats["disorder"] == d).sum()) + 1.0) for d in disorders]
    fig, axes = plt.subplots(1, len(disorders), figsize=(4.6 * len(disorders), max(heights)), squeeze=False)
    for ax, disorder in zip(axes[0], disorders):
        rows = stats[stats["disorder"] == disorder].reset_index(drop=True)
        metric = str(rows["metric"].iloc[0])
        y = np.arange(len(rows))[::-1]
        for yi, rec in zip(y, rows.itertuples(index=False)):
            colour = "C0" if rec.comparison == "family vs baseline" else "C3"
            lo, hi = float(rec.ci_low), float(rec.ci_high)
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [yi, yi], "-", color=colour, lw=1.2)
            filled = str(rec.significant).lower() == "true"
            ax.plot(float(rec.median_difference), yi, "o", ms=4, color=colour, mfc=colour if filled else "white")
        ax.axvline(0.0, color="k", lw=0.7)
        ax.set_yticks(y, [f"{r.model} - {r.baseline}" for r in rows.itertuples(index=False)], fontsize=6)
        better = {1: "positive: model better", -1: "negative: model better"}.get(direction(metric), "")
        ax.set_xlabel(f"median paired difference ({better})", fontsize=7)
        ax.set_title(f"{disorder}: {metric} (n = {int(rows['n'].max())})", fontsize=8)
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle("primary comparisons: median paired difference and bootstrap interval "
                 "(filled: Holm-adjusted p below alpha; red: baseline vs baseline)", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


SOL_METRICS = ("sol_error_vs_fine", "coarse_error_vs_fine", "sol_cost_seconds", "coarse_cost_seconds", "fine_cost_seconds")


def sol_accuracy_cost(frame, path: Path) -> bool:
    """The accelerated mechanistic models: error against the fine solver vs wall time, per disorder,
    for the fine solver (error 0), the plain coarse solver and coarse + correction (each SOL family),
    one point per held-out subject, from the fit jsons (``SOL_METRICS``)."""
    d = frame[frame["metric"].isin(SOL_METRICS)]
    wide = d.pivot_table(index=["subject", "disorder", "model"], columns="metric", values="value", aggfunc="first")
    if wide.empty or not set(SOL_METRICS) <= set(wide.columns):
        _no_data(path, "SOL accuracy vs cost", "no fit json reports the SOL errors and costs against the fine solver")
        return False
    wide = wide.dropna().reset_index()
    disorders = sorted(wide["disorder"].unique())
    fig, axes = plt.subplots(1, len(disorders), figsize=(3.6 * len(disorders), 3.4), squeeze=False)
    for ax, disorder in zip(axes[0], disorders):
        sub = wide[wide["disorder"] == disorder]
        ax.plot(sub["fine_cost_seconds"], np.zeros(len(sub)), "ks", ms=4, label="fine solver")
        ax.plot(sub["coarse_cost_seconds"], sub["coarse_error_vs_fine"], "x", color="0.5", ms=5, label="coarse, uncorrected")
        for model, grp in sub.groupby("model"):
            ax.plot(grp["sol_cost_seconds"], grp["sol_error_vs_fine"], "o", ms=4, label=f"coarse + correction, {model}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a narrow decade labels every minor tick
        ax.set_xlabel("wall time (s)", fontsize=7)
        ax.set_title(disorder, fontsize=8)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("error vs fine solver", fontsize=7)
    fig.suptitle("accelerated mechanistic models (solver-in-the-loop): accuracy vs cost", fontsize=9)
    _save(fig, path)
    return True


def read_training_histories(models_root) -> pd.DataFrame:
    """Loss per epoch of every fold checkpoint under models_root (<disorder>/fold-<k>/model-<family>.pt):
    columns disorder, fold, model, epoch, split (train | validation), loss."""
    import torch

    rows = []
    for path in sorted(Path(models_root).glob("*/fold-*/model-*.pt")) if models_root else []:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise InputError(f"cannot read model checkpoint ({type(exc).__name__}: {exc})", file=path) from None
        disorder, fold = path.parent.parent.name, int(path.parent.name.removeprefix("fold-"))
        model = path.stem.removeprefix("model-")
        # the amortised families keep their parameter network's curve as amortised_history
        curves = {"train": ckpt.get("history") or ckpt.get("amortised_history"), "validation": ckpt.get("val_history")}
        for split, curve in curves.items():
            for epoch, loss in enumerate(curve or []):
                rows.append((disorder, fold, model, epoch, split, float(loss)))
    return pd.DataFrame(rows, columns=["disorder", "fold", "model", "epoch", "split", "loss"])


def training_curves(models_root, path: Path) -> bool:
    """One panel per disorder x trained family: training (solid) and validation (dashed) loss per
    epoch of each fold's model, each curve divided by its first value (so families with different
    losses share a scale)."""
    hist = read_training_histories(models_root)
    if hist.empty:
        _no_data(path, "training curves", "no fold model with a loss history")
        return False
    panels = [(d, m) for d in DISORDERS for m in _models_in(hist[hist["disorder"] == d]) if ((hist["disorder"] == d) & (hist["model"] == m)).any()]
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol, 2.4 * nrow), squeeze=False)
    for ax, (disorder, model) in zip(axes.flat, panels):
        grp = hist[(hist["disorder"] == disorder) & (hist["model"] == model)]
        for (fold, split), curve in grp.groupby(["fold", "split"]):
            first = curve["loss"].iloc[0]
            scale = first if np.isfinite(first) and abs(first) > 0 else 1.0
            ax.plot(curve["epoch"], curve["loss"] / scale, "-" if split == "train" else "--", lw=1,
                    color=f"C{fold}", label=f"fold {fold} {split}")
        ax.set_title(f"{disorder} {model}", fontsize=7)
        if (grp["loss"] > 0).all():
            ax.set_yscale("log")
        ax.tick_params(which="both", labelsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("loss / first epoch's", fontsize=7)
    axes[0][0].legend(fontsize=5)
    fig.suptitle("training curves (solid: training, dashed: validation)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_all(frame: pd.DataFrame, out_dir, forecasts_root=None, targets_root=None, truth_root=None,
              models_root=None, stats: pd.DataFrame | None = None) -> dict[str, bool]:
    """Write every figure of FIGURE_NAMES into out_dir; ``stats`` is the table of
    ``statistics.paired_tests`` (stats.tsv), which names each disorder's primary metric.

    Returns {file name: True if it shows data, False if it is a "no data" panel}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    primary = {} if stats is None or stats.empty else dict(zip(stats["disorder"], stats["metric"]))
    drawn = {}
    for disorder in DISORDERS:
        drawn[f"boxplot_{disorder}.png"] = metric_boxplots(frame, disorder, out / f"boxplot_{disorder}.png",
                                                           primary.get(disorder))
    for disorder in ("glioma", "stroke"):
        drawn[f"overlay_{disorder}.png"] = mask_overlay(frame, disorder, forecasts_root, targets_root,
                                                        out / f"overlay_{disorder}.png")
    drawn["scatter_alzheimer.png"] = alzheimer_scatter(frame, forecasts_root, targets_root, out / "scatter_alzheimer.png")
    drawn["parameter_recovery.png"] = parameter_recovery(frame, forecasts_root, truth_root, out / "parameter_recovery.png",
                                                         targets_root=targets_root)
    drawn["sol_accuracy_cost.png"] = sol_accuracy_cost(frame, out / "sol_accuracy_cost.png")
    drawn["training_curves.png"] = training_curves(models_root, out / "training_curves.png")
    drawn["primary_comparisons.png"] = primary_comparisons(stats, out / "primary_comparisons.png")
    missing = [n for n in FIGURE_NAMES if not (out / n).exists()]
    if missing:  # a bug, not bad input: every branch above writes its file
        raise RuntimeError(f"figures not written: {missing}")
    return drawn


