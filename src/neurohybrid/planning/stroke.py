"""Stroke: predicted final infarct volume against the time from onset to reperfusion, and triage.

For each family whose forecast is the Xue 2021 tissue-death model at its own fitted ischaemic
sensitivity sigma (``mechanistic``; ``amortised``, whose sigma comes from its parameter network),
the model is re-run from onset with the acute CBF for every reperfusion time of a grid, from the
imaging time (the earliest a decision can act) to ``max_reperfusion_h``, and without reperfusion
("never"). The final infarct at the horizon (the follow-up time by default) is the model's core
(D > 0.8) plus the observed acute core, exactly as the forecast makes it
(``disorders.stroke.mechanistic.infarct_from_dead``). The band is the same curve at the two ends of
the fit's interval of sigma (the profile interval where the calibration loss stays within 5% of
its minimum, or the population prior's spread when sigma was not identified); death rises with sigma
(the model sees CBF / sigma), so the ends bound the curve. Families without an interval (amortised)
get no band.

Triage from the acute images: core volume (the acute infarct mask), hypoperfused volume (tissue with
CBF below ``cbf_threshold`` ml/100 ml/min, plus the core) and the mismatch ratio hypoperfused / core.
"""

from __future__ import annotations

import math
import time

import numpy as np

from neurohybrid.disorders.stroke import mechanistic as mech

# families whose forecast is exactly the mechanistic model at their fitted sigma (the hybrids'
# corrections would need their networks, and their curves would mix the correction with the timing)
PLANNED_FAMILIES = ("mechanistic", "amortised")
CURVE_COLUMNS = ["model", "reperfusion_h", "volume_ml", "volume_ml_low", "volume_ml_high"]


def reperfusion_times(hours_acute: float, max_h: float, step_h: float, horizon_h: float) -> list[float]:
    """From the imaging time to ``max_h`` (hours since onset) every ``step_h``, both ends included,
    before the horizon."""
    end = min(float(max_h), float(horizon_h))
    times = [float(hours_acute)]
    t = math.floor(hours_acute / step_h + 1e-9) * step_h + step_h
    while t < end - 1e-9:
        times.append(float(t))
        t += step_h
    if end > times[-1] + 1e-9:
        times.append(end)
    return [t for t in times if t < horizon_h]


def final_infarct(inputs, sigma: float, reperfusion_h, horizon_h: float, s: dict) -> np.ndarray:
    """The final infarct mask (cropped grid) with reperfusion at ``reperfusion_h`` (None: never)."""
    a = inputs.arrays
    cand = mech.candidates(inputs, s)
    dead = np.zeros(a["cbf"].shape, np.float32)
    if cand.any():
        dead[cand] = mech.simulate(a["cbf"][cand], np.clip(a["wm"][cand], 0, 1), float(sigma), float(horizon_h),
                                   reperfusion_h, s)
    return mech.infarct_from_dead(dead, a["core"])


def volume_curve(inputs, sigma: float, times, horizon_h: float, s: dict) -> np.ndarray:
    """Final infarct volume (ml) for each reperfusion time of ``times``, then for "never"."""
    voxel_ml = float(np.prod(inputs.meta["voxel_mm"])) / 1000.0
    return np.array([float(final_infarct(inputs, sigma, t, horizon_h, s).sum()) * voxel_ml for t in list(times) + [None]])


def triage(inputs, cbf_threshold: float, s: dict) -> dict:
    a = inputs.arrays
    voxel_ml = float(np.prod(inputs.meta["voxel_mm"])) / 1000.0
    core = np.asarray(a["core"], bool)
    tissue = (a["wm"] + a["gm"]) >= float(s["tissue_min"])
    hypo = (tissue & (a["cbf"] < float(cbf_threshold))) | core
    core_ml, hypo_ml = float(core.sum()) * voxel_ml, float(hypo.sum()) * voxel_ml
    return dict(core_ml=core_ml, hypoperfused_ml=hypo_ml, mismatch_ml=hypo_ml - core_ml,
                mismatch_ratio=hypo_ml / core_ml if core_ml > 0 else math.inf)


def plan_subject(inputs, fits: dict[str, dict], settings: dict, s: dict) -> dict:
    """Curves (one row per model and reperfusion time; "never" as reperfusion_h NaN) and measure rows."""
    m = inputs.meta
    horizon = float(settings["horizon_h"] if settings["horizon_h"] is not None else m["hours_followup"])
    times = reperfusion_times(float(m["hours_acute"]), float(settings["max_reperfusion_h"]), float(settings["step_h"]), horizon)
    tri = triage(inputs, float(settings["cbf_threshold"]), s)
    rows = [("acute_images", "core_volume", tri["core_ml"], "ml"),
            ("acute_images", "hypoperfused_volume", tri["hypoperfused_ml"], "ml"),
            ("acute_images", "mismatch_volume", tri["mismatch_ml"], "ml"),
            ("acute_images", "mismatch_ratio", tri["mismatch_ratio"], "ratio"),
            ("acute_images", "cbf_threshold", float(settings["cbf_threshold"]), "ml/100 ml/min"),
            ("acute_images", "imaging_time", float(m["hours_acute"]), "h from onset"),
            ("acute_images", "horizon", horizon, "h from onset")]
    curves, seconds = [], {}
    for family, fit in fits.items():
        t0 = time.perf_counter()
        params = fit.get("parameters") or {}
        sigma = float(params["sensitivity"])
        vol = volume_curve(inputs, sigma, times, horizon, s)
        interval = [float(v) for v in (params.get("sensitivity_interval") or [math.nan, math.nan])]
        if all(np.isfinite(interval)):
            low, high = (volume_curve(inputs, v, times, horizon, s) for v in interval)
            low, high = np.minimum(low, high), np.maximum(low, high)
        else:
            low = high = np.full(vol.shape, math.nan)
        for k, t in enumerate(list(times) + [math.nan]):
            curves.append((family, t, vol[k], low[k], high[k]))
        seconds[family] = time.perf_counter() - t0
        first_step = times[1] - times[0] if len(times) > 1 else math.nan
        rows += [(family, "infarct_if_reperfused_now", vol[0], "ml"),
                 (family, "infarct_if_never_reperfused", vol[-1], "ml"),
                 (family, "salvageable_volume", vol[-1] - vol[0], "ml"),
                 (family, "salvage_lost_first_hour", (vol[1] - vol[0]) / first_step if len(times) > 1 else math.nan, "ml/h"),
                 (family, "salvage_lost_per_hour", (vol[len(times) - 1] - vol[0]) / (times[-1] - times[0]) if len(times) > 1 else math.nan,
                  "ml/h"),
                 (family, "sensitivity", sigma, "1 (CBF divisor)")]
        if m.get("reperfusion_h") is not None:
            rows.append((family, "recorded_reperfusion", float(m["reperfusion_h"]), "h from onset"))
    return dict(curves=curves, rows=rows, seconds=seconds, times=times, horizon=horizon, triage=tri)


def figure(path, subject: str, curves, plan: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neurohybrid.io import atomic_path
    from neurohybrid.registry import LABELS

    fig, ax = plt.subplots(figsize=(6, 4))
    by_model: dict[str, list] = {}
    for row in curves:
        by_model.setdefault(row[0], []).append(row)
    for k, (model, rows) in enumerate(by_model.items()):
        t = np.array([r[1] for r in rows[:-1]])
        v, lo, hi = (np.array([r[i] for r in rows[:-1]]) for i in (2, 3, 4))
        color = f"C{k}"
        ax.plot(t, v, "-o", ms=3, color=color, label=f"{LABELS.get(model, model)}")
        if np.all(np.isfinite(lo)):
            ax.fill_between(t, lo, hi, color=color, alpha=0.2, label="sigma interval")
        ax.axhline(rows[-1][2], color=color, ls="--", lw=1, label="never reperfused")
    tri = plan["triage"]
    ax.axhline(tri["core_ml"], color="k", ls=":", lw=1, label="acute core")
    ax.set_xlabel("onset to reperfusion (h)")
    ax.set_ylabel(f"final infarct at {plan['horizon']:.0f} h (ml)")
    ax.set_title(f"sub-{subject}: hypoperfused {tri['hypoperfused_ml']:.0f} ml, core {tri['core_ml']:.1f} ml")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
