"""Per-subject calibration of the Xue 2021 tissue-death model.

One unknown per subject, the ischaemic sensitivity sigma: the model sees CBF / sigma (sigma > 1: tissue
that dies at higher flow, e.g. poorer collaterals or a longer effective occlusion). It is calibrated
so that the model, run from onset with the acute CBF, reproduces the acute core (D > 0.8) at the
acute imaging time: soft Dice of sigmoid((D - 0.8) / tau) against the core, minimised over log sigma
(bounded 1D search). The forecast then runs to the follow-up time with reperfusion at the known
onset-to-reperfusion time (flow back to the tissue's normal CBF, also divided by sigma).
Uncertainty: the profile interval of sigma where the loss stays within 5% (+0.005) of its minimum.

sigma when the acute core is empty or tiny (imaging 1-6 h after onset, often before any voxel has
died): the soft-Dice loss is then the mean death probability, minimised by the least death, so the
fit would sit at sens_min (loss 0) and forecast almost no infarct. With fewer than
``sigma_min_core_voxels`` core voxels on the model grid (a core of 9-20 voxels at 2 mm already pins
sigma within 10% in the tests), sigma counts as unidentified by the acute session: it is taken from a population prior
(``sigma_prior``: the median of the fold's training subjects' sigma, each calibrated on its acute
core AND follow-up infarct; without a trained prior the published Xue 2021 sensitivity, 1),
clipped into the range the acute session allows: nothing outside the core dead at the imaging
time (sigma below ``feasible_sigma_max``; for a tiny core, the profile interval). The fit reports
``sigma_identified`` = false and ``sigma_source`` (StrokeFit.diagnostics).

Only "candidate" voxels are simulated: tissue whose flow could make it die within the bounds of
sigma (F_eff / sigma_max below `candidate_feff`, where H ~ 3e-3 and D stays below ~0.05 after two
days), plus the acute core. Tissue is GM + WM >= `tissue_min`. Everything else keeps D = 0, as the model itself would.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from neurohybrid.settings import resolve

# Time steps of the RK4 solver (``solvers.stroke``), checked on the demo cohort's candidate voxels (4
# subjects, sigma 0.5 / 1 / 1.5, 120 h with and without reperfusion) against RK4 at 10 s: largest
# |error| of D at follow-up 4.5e-6 at 900 s (8e-7 at 600 s, 1.6e-5 at 1200 s), 5e-8 at 300 s,
# 7e-11 at 60 s; no voxel changes side of D = 0.8 at any of them. RK4 is stable for kb dt < 2.78
# (dt < 1290 s); 900 s keeps kb dt = 1.94. dt_s drives the model (calibration, forecasts,
# residual / UDE rollouts); fine_dt_s is the SOL families' fine reference, ~100x more accurate than dt_s.
DEFAULTS = dict(
    crop_margin=3, tissue_min=0.5, dt_s=900.0, soft_tau=0.05, sens_min=0.5, sens_max=1.5, candidate_feff=35.0, fit_iterations=20,
    epochs=12, learning_rate=0.01, hidden=8, residual_penalty=1e-3, train_margin=3, sol_step_hours=24.0, sol_steps=3,
    fine_dt_s=300.0, time_limit_s=None, batch_size=None, val_fraction=0.25, patience=10, threads=1, torch_threads=1, ude_train_voxels=2000,
    residual_train_voxels=4000,
    # sigma when the acute core is empty or tiny (see the module docstring)
    sigma_min_core_voxels=5, sigma_default=1.0,
    # features of the corrections: tissue with CBF below this fraction of its normal flow is hypoperfused
    hypoperfusion_ratio=0.7,
    # residual / amortised_residual / ude training items: chunks of each subject's voxels; batch_size
    # (None: voxel_batch) chunks per optimiser step
    voxel_chunks=8, voxel_batch=4,
    # SOL families (``stroke.sol``): sigma draws per training subject, voxels per draw, optimiser epochs,
    # width of the correction MLP, members per optimiser step, early-stopping patience (epochs), and the
    # coarse step's scheme for the living fraction ("euler": backward Euler, the SOL coarse solver;
    # "exact": exp(-kf T dt), already within ~1e-3 of the fine solver at one step per flow segment)
    sol_draws=4, sol_train_voxels=256, sol_epochs=200, sol_hidden=32, sol_batch_size=2, sol_patience=20,
    sol_coarse_scheme="euler",
)
SLOPPY = dict(fit_iterations=12, epochs=6, voxel_chunks=4, voxel_batch=2, sol_draws=2, sol_train_voxels=64, sol_epochs=15)


def settings(config: dict) -> dict:
    return resolve(config, "stroke")


@dataclasses.dataclass
class StrokeFit:
    sensitivity: float
    loss: float = float("nan")
    seconds: float = 0.0
    interval: tuple[float, float] = (float("nan"), float("nan"))
    identified: bool = True
    source: str = "acute core"  # "acute core" | "fold prior" | "default prior" | "amortised"
    prior_sigma: float | None = None
    feasible_max: float | None = None

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
        out = dict(calibration_loss=self.loss, sigma_identified=bool(self.identified), sigma_source=self.source)
        if self.prior_sigma is not None:
            out["sigma_prior"] = float(self.prior_sigma)
        if self.feasible_max is not None:
            out["sigma_feasible_max"] = float(self.feasible_max)
        return out


def sigma_prior(pairs, s: dict) -> dict:
    """The population prior of sigma from a fold's training subjects (inputs, target): each subject's
    sigma calibrated on its acute core and its follow-up infarct (both observed for training
    subjects; the same fits label the amortised families), summarised by the median (robust with a
    handful of subjects) and the spread of log sigma."""
    values, subjects = [], []
    for inputs, target in pairs:
        fit = calibrate(inputs, s, observations=all_observations(inputs, target, s), interval=False)
        values.append(float(fit.sensitivity))
        subjects.append(inputs.subject)
    if not values:
        return default_prior(s)
    logs = np.log(values)
    return dict(sigma=float(np.exp(np.median(logs))), log_sd=float(np.std(logs)), values=values, subjects=subjects,
                source="fold prior")


def default_prior(s: dict) -> dict:
    return dict(sigma=float(s["sigma_default"]), log_sd=float("nan"), values=[], subjects=[], source="default prior")


def all_observations(inputs, target, s: dict) -> list:
    """(hours, mask over the candidate voxels) of a training subject's acute core and follow-up infarct."""
    from neurohybrid.disorders.stroke.inputs import cropped_target

    cand = candidates(inputs, s)
    tgt = cropped_target(inputs, target)
    return [(float(inputs.meta["hours_acute"]), inputs.arrays["core"][cand]), (float(inputs.meta["hours_followup"]), tgt[cand])]


def sigma_identified(inputs, s: dict) -> bool:
    """Whether the acute core is large enough to pin sigma (``sigma_min_core_voxels``)."""
    return int(inputs.arrays["core"].sum()) >= max(1, int(s["sigma_min_core_voxels"]))


def feasible_sigma_max(inputs, s: dict) -> float:
    """The largest sigma in [sens_min, sens_max] at which nothing measurable outside the acute core
    has died (D > 0.8) by the imaging time: fewer than ``sigma_min_core_voxels`` voxels (the size
    below which an observed core counts as nothing) beyond those that die at every admissible sigma.
    Those are voxels the model cannot explain whatever sigma (on the demo's 4 mm grid: tissue
    voxels at the brain's edge with a CBF of 0, outside the CBF image's brain); counting them would
    pin sigma at sens_min. D rises with sigma (the model sees CBF / sigma): a bisection on log sigma.
    """
    return inputs.shared.get("stroke.feasible_sigma_max", s, lambda: _feasible_sigma_max(inputs, s))


def _feasible_sigma_max(inputs, s: dict) -> float:
    from neurohybrid.solvers.stroke import CORE_THRESHOLD

    a, m = inputs.arrays, inputs.meta
    cand = candidates(inputs, s) & ~a["core"].astype(bool)
    lo, hi = np.log(float(s["sens_min"])), np.log(float(s["sens_max"]))
    if not cand.any():
        return float(np.exp(hi))
    cbf, wm = a["cbf"][cand], np.clip(a["wm"][cand], 0, 1)
    hours = float(m["hours_acute"])

    def n_dead(log_sigma):
        return int((simulate(cbf, wm, float(np.exp(log_sigma)), hours, m["reperfusion_h"], s) > CORE_THRESHOLD).sum())

    allowed = n_dead(lo) + max(1, int(s["sigma_min_core_voxels"]))

    def alive(log_sigma):
        return n_dead(log_sigma) < allowed

    if alive(hi):
        return float(np.exp(hi))
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if alive(mid) else (lo, mid)
    return float(np.exp(lo))


def apply_prior(fit: "StrokeFit", inputs, s: dict, prior: dict | None) -> "StrokeFit":
    """sigma from the prior, clipped into what the acute session allows, when the core does not
    identify it; the fit unchanged otherwise."""
    if sigma_identified(inputs, s):
        return fit
    prior = prior or default_prior(s)
    start = time.perf_counter()
    top = feasible_sigma_max(inputs, s)
    lo, hi = float(s["sens_min"]), top
    if inputs.arrays["core"].any() and np.all(np.isfinite(fit.interval)):
        # a tiny core: the range its soft Dice allows, and nothing else dead
        lo = max(lo, fit.interval[0])
        hi = max(min(hi, fit.interval[1]), lo)
    sigma = float(np.clip(prior["sigma"], lo, hi))
    sd = prior.get("log_sd")
    if sd is not None and np.isfinite(sd) and sd > 0:
        interval = (float(np.clip(sigma * np.exp(-sd), lo, hi)), float(np.clip(sigma * np.exp(sd), lo, hi)))
    else:
        interval = (lo, hi)
    return dataclasses.replace(fit, sensitivity=sigma, interval=interval, identified=False, source=prior["source"],
                               prior_sigma=float(prior["sigma"]), feasible_max=top,
                               seconds=fit.seconds + time.perf_counter() - start)


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


def calibrate(inputs, s: dict, *, observations=None, interval: bool = True, prior: dict | None = None) -> StrokeFit:
    """Fit sigma. observations: list of (hours, mask over the candidate voxels); default the acute core.
    interval=False skips the profile interval (callers that use sigma alone, e.g. training labels).
    With the default observations (the acute core), a core below ``sigma_min_core_voxels`` leaves sigma
    unidentified: it comes from ``prior`` (``sigma_prior``; None: the default prior), see ``apply_prior``.

    Done once per subject's inputs (``inputs.shared``, keyed on the settings, the observations and
    ``interval``): the families of one forecast job all start from this fit."""
    fit = inputs.shared.get("stroke.calibrate", (s, observations, interval),
                            lambda: _calibrate(inputs, s, observations, interval))
    if observations is None:
        fit = apply_prior(fit, inputs, s, prior)
    return fit


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
