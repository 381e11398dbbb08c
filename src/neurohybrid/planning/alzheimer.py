"""Alzheimer's: regional tau trajectories, time to a meta-region threshold, and a trial simulation.

For each family whose forecast is the mechanistic network model at its own parameters
(``mechanistic``, per-subject calibration; ``amortised``, parameters from its network), the local
network Fisher-KPP (``disorders.alzheimer.model.mechanistic_rhs``, the same right-hand side and RK4
step rule as the forecast) is run from the LAST observed visit forward for ``max_years``:

- regional SUVR at each of ``horizons_years`` after the last visit, with a 95% band from draws of
  the parameters from the fit's Laplace standard deviations (``kappa_sd``, ``alpha_sd``,
  ``suvr_amplitude_sd``: normal on the natural scale, clipped to the calibration box); families
  without standard deviations (amortised) get no band;
- the time until the mean SUVR of the meta-region (config ``planning.alzheimer.meta_region``, by
  default the Braak III/IV regions) crosses ``positivity_suvr`` (0 when it is already above;
  censored at ``max_years``);
- a trial: production alpha lowered by ``production_reduction`` from the last visit on, and the
  delay it buys in that crossing time. A zero reduction is the plain forecast.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

TRAJECTORY_COLUMNS = ["model", "region", "years_after_last_visit", "suvr", "suvr_low", "suvr_high"]
PLANNED_FAMILIES = ("mechanistic", "amortised")
N_DRAWS = 64
OUTPUT_STEP_YEARS = 0.05


def simulate(subject, settings, theta: np.ndarray, years: np.ndarray) -> np.ndarray:
    """Regional SUVR (M, T, N) for parameter rows theta (M, 3), from the subject's last observed visit,
    at ``years`` after it (years[0] = 0), by the forecast's RK4 with its step rule."""
    from neurohybrid.disorders.alzheimer.model import RK4_STABLE, mechanistic_rhs
    from neurohybrid.hybrid.neural_ode import HybridDynamics, integrate

    theta = np.atleast_2d(np.asarray(theta, np.float64))
    m = theta.shape[0]
    dtype = torch.float64
    base = torch.as_tensor(subject.baseline(settings), dtype=dtype).expand(m, -1)
    lap = torch.as_tensor(subject.lap, dtype=dtype).expand(m, -1, -1)
    first = torch.as_tensor(subject.suvr[-1], dtype=dtype).expand(m, -1).clone()
    th = torch.as_tensor(theta, dtype=dtype)
    # the step rule of model.stable_step (the forecast's), over all members
    rho = float(np.abs(np.linalg.eigvals(subject.lap)).max())
    e_max = float(np.maximum(subject.suvr[-1] - subject.baseline(settings), 0).max())
    lam = float((th[:, 0] * rho + th[:, 1] * (1.0 + 2.0 * e_max / th[:, 2])).max())
    step = min(float(settings.dt), RK4_STABLE / max(lam, 1e-9))
    dyn = HybridDynamics(mechanistic_rhs(th, base, lap), None)
    with torch.no_grad():
        out = integrate(dyn, first, torch.as_tensor(np.asarray(years, np.float64), dtype=dtype), method="rk4", step_size=step)
    return out.cpu().numpy()


def draws(theta: np.ndarray, sd, bounds, n: int, seed: int) -> np.ndarray | None:
    """(n, 3) parameter draws from the Laplace sds, clipped to the calibration box; None without sds."""
    sd = np.asarray([math.nan if v is None else float(v) for v in sd], float)
    if not np.all(np.isfinite(sd)):
        return None
    rng = np.random.default_rng(seed)
    out = theta[None] + rng.standard_normal((n, theta.size)) * sd[None]
    return np.clip(out, np.asarray(bounds.lower, float), np.asarray(bounds.upper, float))


def crossing_time(years: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """First time the curve reaches ``threshold`` (linear interpolation; 0 if already there, inf if never)."""
    above = np.flatnonzero(values >= threshold)
    if above.size == 0:
        return math.inf
    k = int(above[0])
    if k == 0:
        return 0.0
    y0, y1 = values[k - 1], values[k]
    return float(years[k - 1] + (threshold - y0) / (y1 - y0) * (years[k] - years[k - 1]))


def plan_subject(subject, settings, fits: dict[str, dict], plan_settings: dict, seed: int = 0) -> dict:
    horizons = [float(h) for h in plan_settings["horizons_years"]]
    max_years = max(float(plan_settings["max_years"]), max(horizons))
    years = np.unique(np.concatenate([np.arange(0.0, max_years + 1e-9, OUTPUT_STEP_YEARS), horizons]))
    meta = [r for r in plan_settings["meta_region"] if r in subject.regions]
    if not meta:
        from neurohybrid.errors import InputError

        raise InputError("none of the meta-region's regions (planning.alzheimer.meta_region) is among the subject's regions",
                         subject=subject.subject)
    idx = [subject.regions.index(r) for r in meta]
    threshold = float(plan_settings["positivity_suvr"])
    reduction = float(plan_settings["production_reduction"])
    now = float(subject.suvr[-1][idx].mean())
    rows = [("observed", "meta_region_suvr_now", now, "SUVR"),
            ("observed", "meta_region_size", float(len(meta)), "regions"),
            ("observed", "positivity_threshold", threshold, "SUVR"),
            ("observed", "production_reduction", reduction, "fraction of alpha")]
    trajectory, curves, seconds = [], {}, {}
    for family, fit in fits.items():
        t0 = time.perf_counter()
        p = fit.get("parameters") or {}
        theta = np.array([float(p["kappa"]), float(p["alpha"]), float(p["suvr_amplitude"])])
        sample = draws(theta, [p.get("kappa_sd"), p.get("alpha_sd"), p.get("suvr_amplitude_sd")], settings.bounds(),
                       N_DRAWS, seed)
        trial = theta * np.array([1.0, 1.0 - reduction, 1.0])
        rows_theta = [theta, trial] + ([] if sample is None else list(sample))
        states = simulate(subject, settings, np.stack(rows_theta), years)
        plain, treated = states[0], states[1]
        band = states[2:] if sample is not None else None
        for h in horizons:
            k = int(np.argmin(np.abs(years - h)))
            lo = np.percentile(band[:, k], 2.5, axis=0) if band is not None else np.full(len(subject.regions), math.nan)
            hi = np.percentile(band[:, k], 97.5, axis=0) if band is not None else np.full(len(subject.regions), math.nan)
            for j, region in enumerate(subject.regions):
                trajectory.append((family, region, h, float(plain[k, j]), float(lo[j]), float(hi[j])))
            rows.append((family, f"meta_region_suvr_at_{h:g}y", float(plain[k, idx].mean()), "SUVR"))
        meta_plain, meta_trial = plain[:, idx].mean(axis=1), treated[:, idx].mean(axis=1)
        t_plain, t_trial = crossing_time(years, meta_plain, threshold), crossing_time(years, meta_trial, threshold)
        rows += [(family, "years_to_positivity", t_plain, "years after last visit (inf: not within max_years)"),
                 (family, "years_to_positivity_trial", t_trial, "years after last visit (inf: not within max_years)"),
                 (family, "delay_bought", t_trial - t_plain if math.isfinite(t_trial) or math.isfinite(t_plain) else math.nan,
                  "years (inf: the trial keeps it below threshold within max_years)")]
        if band is not None:
            tb = np.array([crossing_time(years, s[:, idx].mean(axis=1), threshold) for s in band])
            finite = tb[np.isfinite(tb)]
            rows += [(family, "years_to_positivity_low", float(np.percentile(tb, 2.5, method="nearest")), "years after last visit"),
                     (family, "years_to_positivity_high", float(np.percentile(tb, 97.5, method="nearest")), "years after last visit"),
                     (family, "draws_crossing", float(finite.size) / tb.size, "fraction of parameter draws")]
        curves[family] = (meta_plain, meta_trial, None if band is None else band[:, :, idx].mean(axis=2))
        seconds[family] = time.perf_counter() - t0
    return dict(trajectory=trajectory, rows=rows, seconds=seconds, years=years, curves=curves, threshold=threshold,
                reduction=reduction)


CURVE_COLUMNS = ["model", "years_after_last_visit", "suvr", "suvr_trial", "suvr_low", "suvr_high"]
CURVE_STEP_YEARS = 0.25


def curve_rows(plan: dict) -> list[tuple]:
    """The meta-region mean SUVR over the simulated span (every ``CURVE_STEP_YEARS``), without and with
    the trial, and the 95% band of the parameter draws (NaN without draws)."""
    years = plan["years"]
    keep = np.flatnonzero(np.isclose(np.mod(years + 1e-9, CURVE_STEP_YEARS), 0.0, atol=1e-6))
    rows = []
    for model, (plain, trial, band) in plan["curves"].items():
        lo = np.percentile(band, 2.5, axis=0) if band is not None else np.full(years.shape, math.nan)
        hi = np.percentile(band, 97.5, axis=0) if band is not None else np.full(years.shape, math.nan)
        rows += [(model, float(years[k]), float(plain[k]), float(trial[k]), float(lo[k]), float(hi[k])) for k in keep]
    return rows
