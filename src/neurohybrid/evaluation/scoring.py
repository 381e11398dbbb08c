"""Score one subject's forecast of one model family: files in, tidy rows out.

Forecast files follow docs/architecture.md ("Models"):
``<forecast_dir>/sub-<id>_model-<family>_desc-fit.json`` plus
glioma ``..._desc-{T1Gd,FLAIR}_mask.nii.gz``, alzheimer ``..._pet.tsv`` (region, suvr),
stroke ``..._desc-infarct_mask.nii.gz``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError
from neurohybrid.evaluation import metrics as M
from neurohybrid.evaluation.analysis import PLAN_METRICS
from neurohybrid.evaluation.recovery import recovery_scores
from neurohybrid.evaluation.targets import Target, bare_subject, read_target
from neurohybrid.io import load_image
from neurohybrid.io.tsv import read_table

COLUMNS = ["subject", "disorder", "model", "metric", "value"]
# why a value is missing (n/a): the cohort counts missing values with their reasons, never drops them
REASON = "missing_reason"
# 1 when the subject's inputs record a treatment (glioma: a radiotherapy table), else 0: the cohort
# summary splits the patients by it
TREATED = "treated"
TABLE_COLUMNS = COLUMNS + [REASON, TREATED]

# values copied from the fit json into the table as they are (the sol_* / coarse_* / fine_* ones:
# the solver-in-the-loop families' accuracy against the fine solver and the costs it saves)
FIT_JSON_METRICS = ("fit_seconds", "inference_seconds", "sol_error_vs_fine", "coarse_error_vs_fine",
                    "sol_cost_seconds", "coarse_cost_seconds", "fine_cost_seconds")


def forecast_path(forecast_dir, subject: str, model: str, suffix: str) -> Path:
    sub = bare_subject(subject)
    return Path(forecast_dir) / f"sub-{sub}_model-{model}_{suffix}"


def read_fit_json(forecast_dir, subject: str, model: str) -> dict:
    path = forecast_path(forecast_dir, subject, model, "desc-fit.json")
    sub = bare_subject(subject)
    if not path.exists():
        raise InputError("fit json not found", file=path, subject=sub)
    try:
        fit = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read fit json ({type(exc).__name__}: {exc})", file=path, subject=sub) from None
    if not isinstance(fit, dict):
        raise InputError("fit json must hold an object", file=path, subject=sub)
    if "parameters" in fit and not isinstance(fit["parameters"], dict):
        raise InputError("'parameters' must be an object", file=path, subject=sub)
    return fit


def read_truth(truth_root, subject: str) -> dict:
    """All JSON files of the subject's ground-truth folder merged (later files win on clashes).

    The synth decides the file names; evaluation only needs the numbers whose keys match
    the fitted parameters. An absent folder means no ground truth (a real cohort): {}.
    """
    sub = bare_subject(subject)
    folder = Path(truth_root) / f"sub-{sub}"
    merged: dict = {}
    if not folder.is_dir():
        return merged
    for path in sorted(folder.glob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read ground-truth json ({type(exc).__name__}: {exc})", file=path, subject=sub) from None
        if isinstance(obj, dict):
            merged.update(obj)
    return merged


def load_forecast_mask(path: Path, target: Target, key: str) -> np.ndarray:
    img = load_image(path, subject=target.subject, ndim=3)
    data = np.asanyarray(img.dataobj)
    if not np.all(np.isin(data, (0, 1))):
        raise InputError("forecast mask must hold only 0 and 1", file=path, subject=target.subject)
    ref = target.arrays[key]
    if data.shape != ref.shape:
        raise InputError(f"forecast shape {data.shape} differs from the target's {ref.shape} ({target.npz_path.name})",
                         file=path, subject=target.subject)
    if target.affine is not None and not np.allclose(img.affine, target.affine, atol=1e-3):
        raise InputError(f"forecast affine differs from the target's ({target.json_path.name})", file=path, subject=target.subject)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.allclose(zooms, target.voxel_mm, rtol=1e-3):
        raise InputError(f"forecast voxel size {zooms.tolist()} differs from the target's {target.voxel_mm.tolist()}",
                         file=path, subject=target.subject)
    return data.astype(bool)


def _mask_scores(pred: np.ndarray, obs: np.ndarray, voxel_mm, tag: str, reasons: dict) -> dict[str, float]:
    v_pred, v_obs = M.volume_ml(pred, voxel_mm), M.volume_ml(obs, voxel_mm)
    hd95 = M.hausdorff95(pred, obs, voxel_mm)
    if not np.isfinite(hd95):  # exactly one mask is empty: no surface to measure from
        reasons[f"hd95_mm_{tag}"] = "empty forecast mask" if not pred.any() else "empty observed mask"
    return {
        f"dice_{tag}": M.dice(pred, obs),
        f"volume_error_ml_{tag}": v_pred - v_obs,
        f"abs_volume_error_ml_{tag}": abs(v_pred - v_obs),
        f"hd95_mm_{tag}": hd95,
    }


def read_regional_forecast(path: Path, subject: str, regions: list[str]) -> np.ndarray:
    """A forecast's SUVR in the target's region order; every target region must be present."""
    table = read_table(path, subject=subject, required=["region", "suvr"])
    if table["region"].duplicated().any():
        dup = table.loc[table["region"].duplicated(), "region"].iloc[0]
        raise InputError(f"region '{dup}' listed twice", file=path, subject=subject)
    values = pd.to_numeric(table["suvr"], errors="coerce")
    series = pd.Series(values.to_numpy(), index=table["region"].astype(str))
    missing = [r for r in regions if r not in series.index]
    if missing:
        raise InputError(f"{len(missing)} target region(s) missing from the forecast, e.g. {missing[0]}", file=path, subject=subject)
    out = series.loc[regions].to_numpy(dtype=float)
    if not np.all(np.isfinite(out)):
        raise InputError("forecast suvr has missing or non-numeric values", file=path, subject=subject)
    return out


def score_glioma(forecast_dir, target: Target, model: str, reasons: dict) -> dict[str, float]:
    out = {}
    for key, desc in (("t1gd", "T1Gd"), ("flair", "FLAIR")):
        path = forecast_path(forecast_dir, target.subject, model, f"desc-{desc}_mask.nii.gz")
        pred = load_forecast_mask(path, target, key)
        out.update(_mask_scores(pred, target.arrays[key], target.voxel_mm, key, reasons))
    return out


def score_stroke(forecast_dir, target: Target, model: str, reasons: dict) -> dict[str, float]:
    path = forecast_path(forecast_dir, target.subject, model, "desc-infarct_mask.nii.gz")
    pred = load_forecast_mask(path, target, "infarct")
    return _mask_scores(pred, target.arrays["infarct"], target.voxel_mm, "infarct", reasons)


def score_alzheimer(forecast_dir, target: Target, model: str, reasons: dict) -> dict[str, float]:
    regions = [str(r) for r in target.meta["regions"]]
    obs = target.arrays["suvr"]
    path = forecast_path(forecast_dir, target.subject, model, "pet.tsv")
    pred = read_regional_forecast(path, target.subject, regions)
    out = {"rmse_suvr": M.rmse(pred, obs), "pearson_r": M.pearson_r(pred, obs)}
    if not np.isfinite(out["pearson_r"]):
        reasons["pearson_r"] = "forecast or observation constant across regions: r undefined"
    # "no change" reference: only when its forecast sits beside ours; otherwise the cohort
    # table adds the ratio by joining the persistence rows
    persistence = forecast_path(forecast_dir, target.subject, "persistence", "pet.tsv")
    if persistence.exists():
        ref = read_regional_forecast(persistence, target.subject, regions)
        out["rmse_rel_persistence"] = M.relative_error(out["rmse_suvr"], M.rmse(ref, obs))
        if not np.isfinite(out["rmse_rel_persistence"]):
            reasons["rmse_rel_persistence"] = "no-change RMSE is 0"
    return out


def plan_coverage(subject: str, plan_dir, targets_root) -> pd.DataFrame:
    """Glioma: the share of the held-out session's FLAIR and T1Gd tumour inside each radiotherapy
    target of ``neurohybrid plan glioma`` (``sub-S_model-<model>_desc-ctv_mask.nii.gz``: the
    families' personalised targets and ``standard_margin``, all of the same volume). Rows
    ``ctv_coverage_flair`` / ``ctv_coverage_t1gd`` per model; n/a with the reason when the held-out
    mask is empty. Planning never reads the target; this is where the plans meet it."""
    sub = bare_subject(subject)
    target = read_target(targets_root, sub, "glioma")
    # the model-grid masks (those in the subject's T1w space carry space-T1w and are not scored)
    paths = [p for p in sorted(Path(plan_dir).glob(f"sub-{sub}_model-*_desc-ctv_mask.nii.gz")) if "_space-" not in p.name]
    if not paths:
        raise InputError("no radiotherapy target (desc-ctv_mask) to score", file=plan_dir, subject=sub)
    rows = []
    treated = int(bool(target.meta.get(TREATED, False)))
    for path in paths:
        model = path.name[len(f"sub-{sub}_model-"):-len("_desc-ctv_mask.nii.gz")]
        ctv = load_forecast_mask(path, target, "flair")
        for metric in PLAN_METRICS["glioma"]:
            key = metric.removeprefix("ctv_coverage_")
            obs = np.asarray(target.arrays[key], bool)
            n = int(obs.sum())
            value = float((ctv & obs).sum()) / n if n else math.nan
            rows.append((sub, "glioma", model, metric, value,
                         "" if n else f"held-out {key} mask is empty", treated))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


SCORERS = {"glioma": score_glioma, "alzheimer": score_alzheimer, "stroke": score_stroke}


def evaluate_subject(disorder: str, subject: str, model: str, forecast_dir, targets_root, truth_root=None) -> pd.DataFrame:
    """All metrics of one subject and model as a tidy table (TABLE_COLUMNS): a value that is n/a
    carries the reason in ``missing_reason``."""
    sub = bare_subject(subject)
    target = read_target(targets_root, sub, disorder)
    fit = read_fit_json(forecast_dir, sub, model)
    reasons: dict[str, str] = {}
    values = SCORERS[disorder](forecast_dir, target, model, reasons)
    for key in FIT_JSON_METRICS:
        if key in fit:
            try:
                values[key] = float(fit[key]) if fit[key] is not None else math.nan
            except (TypeError, ValueError):
                raise InputError(f"'{key}' must be a number, got {fit[key]!r}",
                                 file=forecast_path(forecast_dir, sub, model, "desc-fit.json"), subject=sub) from None
            if fit[key] is None:
                reasons[key] = "not reported by the fit"
    if truth_root is not None and fit.get("parameters"):
        scores, why = recovery_scores(disorder, fit, read_truth(truth_root, sub), target.meta)
        values.update(scores)
        reasons.update(why)
    rows = []
    treated = int(bool(target.meta.get(TREATED, False)))
    for name, v in values.items():
        value = float(v) if v is not None else math.nan
        reason = "" if np.isfinite(value) else reasons.get(name, "undefined")
        rows.append((sub, disorder, model, name, value, reason, treated))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
