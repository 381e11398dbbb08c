"""Per-subject calibration of the Xue 2021 tissue-death model.

One unknown per subject, the ischaemic sensitivity sigma: the model sees CBF / sigma (sigma > 1: tissue
that dies at higher flow, e.g. poorer collaterals or a longer effective occlusion). It is calibrated
so that the model, run from onset with the acute CBF, reproduces the acute core (D > 0.8) at the
acute imaging time: soft Dice of sigmoid((D - 0.8) / tau) against the core, minimised over log sigma
(bounded 1D search). The forecast then runs to the follow-up time with reperfusion at the known
onset-to-reperfusion time (flow back to the tissue's normal CBF, also divided by sigma).
Uncertainty: the profile interval of sigma where the loss stays within 5% (+0.005) of its minimum.

Only "candidate" voxels are simulated: tissue whose flow could make it die within the bounds of
sigma (F_eff / sigma_max below `candidate_feff`, where H ~ 3e-3 and D stays below ~0.05 after two
days), plus the acute core. Tissue is GM + WM >= `tissue_min`. Everything else keeps D = 0, as the model itself would.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from neurohybrid.disorders import voxel

# Time steps of the RK4 solver (``solvers.stroke``), checked on the demo cohort's candidate voxels (4
# subjects, sigma 0.5 / 1 / 1.5, 120 h with and without reperfusion) against RK4 at 10 s: largest
# |error| of D at follow-up 4.5e-6 at 900 s (8e-7 at 600 s, 1.6e-5 at 1200 s), 5e-8 at 300 s,
# 7e-11 at 60 s; no voxel changes side of D = 0.8 at any of them. RK4 is stable for kb dt < 2.78
# (dt < 1290 s); 900 s keeps kb dt = 1.94. dt_s drives the model (calibration, forecasts,
# residual / UDE rollouts); fine_dt_s is the SOL families' fine reference, ~100x more accurate than dt_s.
DEFAULTS = dict(
    crop_margin=3, tissue_min=0.5, dt_s=900.0, soft_tau=0.05, sens_min=0.5, sens_max=1.5, candidate_feff=35.0, fit_iterations=20,
    epochs=12, learning_rate=0.01, hidden=8, residual_penalty=1e-3, train_margin=3, sol_step_hours=6.0, sol_steps=3,
    sol_train_steps=6, fine_dt_s=300.0, time_limit_s=None, batch_size=None, val_fraction=0.0, patience=None, threads=1, torch_threads=1, ude_train_voxels=2000,
    residual_train_voxels=4000,
)
SLOPPY = dict(fit_iterations=12, epochs=6, sol_train_steps=4)


def settings(config: dict) -> dict:
    return voxel.settings(config, "stroke", DEFAULTS, SLOPPY)


@dataclasses.dataclass
class StrokeFit:
    sensitivity: float
    loss: float = float("nan")
    seconds: float = 0.0
    interval: tuple[float, float] = (float("nan"), float("nan"))

    def parameters(self) -> dict:
        """What the fit json reports as ``parameters``, i.e. what parameter recovery scores: only
        sigma, whose counterpart in the synthetic ground truth is ``disease.sensitivity`` (1: the
        generator drives the same Xue 2021 model with the unscaled CBF; ``synth.stroke``). Its
        interval (a list, not scored) rides along. The generator's other parameters (collateral
        strength and time constant, inflow scale) have no counterpart in this model, and the
        timing (``seconds``) is the forecast's ``fit_seconds``, not a parameter."""
        return dict(sensitivity=self.sensitivity, sensitivity_interval=list(self.interval))

    def diagnostics(self) -> dict:
        """The fit's quality, reported beside the parameters (not scored against a truth)."""
        return dict(calibration_loss=self.loss)


def candidates(inputs, s: dict) -> np.ndarray:
    from neurohybrid.solvers.stroke import perfusion_multiplier

    a = inputs.arrays
    # mostly-tissue voxels only: partial-volume voxels at the brain's edge hold CSF, whose near-zero
    # "flow" would otherwise read as ischaemia
    tissue = (a["wm"] + a["gm"]) >= float(s["tissue_min"])
    feff = a["cbf"] * perfusion_multiplier(np.clip(a["wm"], 0, 1))
    return (tissue & (feff / float(s["sens_max"]) < float(s["candidate_feff"]))) | a["core"].astype(bool)


def simulate(cbf, wm, sensitivity, hours, reperfusion_h, s: dict, *, save_hours=None, dt_s=None) -> np.ndarray:
    """Dead fraction D of the given voxels (any shape) at `hours` (or stacked at save_hours)."""
    from neurohybrid.solvers.stroke import normal_cbf, simulate_tissue_death

    rep = reperfusion_h if reperfusion_h is not None and reperfusion_h < hours else None
    out = simulate_tissue_death(np.asarray(cbf, np.float64) / sensitivity, hours=hours, reperfusion_h=rep,
                                cbf_after=normal_cbf(wm) / sensitivity, wm_fraction=wm,
                                dt_s=float(dt_s or s["dt_s"]), save_hours=save_hours, threads=int(s["threads"]))
    return out["dead"]


def _soft_dice(p, m):
    if m.sum() == 0:
        return float(p.mean())
    return 1.0 - 2.0 * float((p * m).sum()) / (float(p.sum() + m.sum()) + 1e-6)


def calibrate(inputs, s: dict, *, observations=None, interval: bool = True) -> StrokeFit:
    """Fit sigma. observations: list of (hours, mask over the candidate voxels); default the acute core.
    interval=False skips the profile interval (callers that use sigma alone, e.g. training labels).

    Memoised per process (``neurohybrid.hybrid.cache``, keyed on the inputs' content, the settings,
    the observations and ``interval``): the families of one forecast job all start from this fit."""
    from neurohybrid.hybrid import cache

    return cache.memo("stroke.calibrate", (inputs, s, observations, interval),
                      lambda: _calibrate(inputs, s, observations, interval))


def _calibrate(inputs, s: dict, observations, with_interval: bool) -> StrokeFit:
    from scipy.optimize import minimize_scalar

    from neurohybrid.solvers.stroke import CORE_THRESHOLD

    start = time.perf_counter()
    a, m = inputs.arrays, inputs.meta
    cand = candidates(inputs, s)
    cbf, wm = a["cbf"][cand], np.clip(a["wm"][cand], 0, 1)
    if observations is None:
        observations = [(float(m["hours_acute"]), a["core"][cand])]
    hours = sorted({h for h, _ in observations})
    tau = float(s["soft_tau"])
    lo, hi = np.log(float(s["sens_min"])), np.log(float(s["sens_max"]))

    def loss(log_sigma):
        if cbf.size == 0:
            return 0.0
        dead = simulate(cbf, wm, float(np.exp(log_sigma)), hours[-1], m["reperfusion_h"], s, save_hours=hours)
        val = 0.0
        for h, mask in observations:
            p = 1.0 / (1.0 + np.exp(-(dead[hours.index(h)] - CORE_THRESHOLD) / tau))
            val += _soft_dice(p, mask.astype(float))
        return val / len(observations)

    grid_x = np.linspace(lo, hi, 7)
    grid_l = np.array([loss(x) for x in grid_x])
    k = int(np.argmin(grid_l))
    a_, b_ = grid_x[max(k - 1, 0)], grid_x[min(k + 1, grid_x.size - 1)]
    res = minimize_scalar(loss, bounds=(a_, b_), method="bounded", options={"xatol": 1e-3, "maxiter": int(s["fit_iterations"])})
    best_x, best_l = (res.x, float(res.fun)) if res.fun <= grid_l[k] else (grid_x[k], float(grid_l[k]))
    # profile interval: walk out from the optimum in steps of 2% until the loss rises by 5% (+0.005)
    bound = best_l * 1.05 + 0.005
    ends = [] if with_interval else [float("nan")] * 2
    for sign in (-1.0, 1.0) if with_interval else ():
        x = best_x
        for _ in range(15):
            nxt = x + sign * 0.02
            if not lo <= nxt <= hi or loss(nxt) > bound:
                break
            x = nxt
        ends.append(x)
    interval = (float(np.exp(ends[0])), float(np.exp(ends[1])))
    return StrokeFit(float(np.exp(best_x)), best_l, time.perf_counter() - start, interval)


def forecast_dead(inputs, fit: StrokeFit, s: dict) -> np.ndarray:
    """D at the follow-up time on the whole crop (0 outside the candidate voxels)."""
    a, m = inputs.arrays, inputs.meta
    cand = candidates(inputs, s)
    dead = np.zeros(a["cbf"].shape, np.float32)
    if cand.any():
        dead[cand] = simulate(a["cbf"][cand], np.clip(a["wm"][cand], 0, 1), fit.sensitivity, float(m["hours_followup"]),
                              m["reperfusion_h"], s)
    return dead


def infarct_from_dead(dead, core) -> np.ndarray:
    """Final infarct: the model's core (D > 0.8) plus the observed acute core (dead tissue stays dead)."""
    from neurohybrid.solvers.stroke import CORE_THRESHOLD

    return (np.asarray(dead) > CORE_THRESHOLD) | np.asarray(core, bool)
