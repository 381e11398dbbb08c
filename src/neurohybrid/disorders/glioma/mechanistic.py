"""Per-subject calibration of the Fisher-Kolmogorov glioma model on the earlier sessions.

Unknowns: D_w (mm^2/day), rho (1/day), t0 (days from the seed to the first session) and, when
``fit_thresholds`` is set, the T1Gd/FLAIR visibility thresholds. The seed sits at the centroid of the
first session's T1Gd mask (FLAIR when T1Gd is empty): the enhancing core is where the tumour has been
longest. The loss compares the model's soft observation sigmoid((u - theta) / tau) with the observed
masks by soft Dice (smooth in the parameters, unlike hard Dice, so Nelder-Mead does not stall on
plateaus), plus a weak log-normal prior on D_w and rho: with a single earlier session the front speed
2 sqrt(D_w rho) and t0 trade off, and the prior picks the literature-typical member of that family.

The search is derivative-free (``neurohybrid.hybrid.calibration.calibrate_derivative_free``, Nelder-
Mead with restarts) on the Numba solver, simulated only in a box around the tumour (the far brain
never reaches the observation thresholds within the fitted times), which keeps one loss
evaluation at milliseconds. Uncertainty: the spread of the restarts that reach the best loss.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from neurohybrid.disorders import voxel
from neurohybrid.disorders.glioma.treatment import Treatment
from neurohybrid.errors import InputError
from neurohybrid.settings import resolve

DEFAULTS = dict(
    crop_margin=3, theta_t1gd=0.7, theta_flair=0.25, dg_ratio=0.1, max_rho_dt=0.2, soft_tau=0.02,
    # calibration budget: Nelder-Mead evaluations per restart x restarts. Measured on the demo
    # cohort's 4 glioma patients (4 mm; issue 16's closing note of 2026-12-01): at 40 x 2 with the
    # old prior centre (0.1, 0.05) the fitted state at the last session missed the observed FLAIR
    # volume by up to 58% and the forecast FLAIR Dice was 0.62-0.82; at 120 x 3 with this centre by
    # at most 16%, Dice 0.76-0.87
    seed_sigma_mm=2.0, restarts=3, fit_iterations=120, calib_margin=6, fit_thresholds=False,
    # the prior's centre: the log-space centroid of the prior ranges below (``draw_prior``; test:
    # test_glioma_prior_centre_is_the_centroid_of_the_prior_ranges)
    prior_dw=0.068, prior_rho=0.0193, prior_weight=0.02,
    # training (data_driven, residual, ude, amortised_residual): mini-batches of `batch_size` items
    # (training subjects, or their patches when there are fewer than 3), a validation subset of
    # `val_fraction` of the items with early stopping after `patience` epochs without improvement
    epochs=4, learning_rate=0.01, hidden=8, residual_penalty=0.1, train_margin=4,
    time_limit_s=None, batch_size=1, val_fraction=0.25, patience=2, threads=1, torch_threads=1,
    # solver in the loop (sol, sol_precomputed; families.SolverInLoop): a 2x coarser grid advanced in
    # macro steps of at most `sol_step_days` (the step is an input of the correction), SOL-`sol_steps`;
    # training data: `sol_draws` parameter draws per training subject, each a fine trajectory of
    # `sol_train_steps` macro steps from the subject's calibrated state at its last session;
    # `sol_epochs` epochs of mini-batches of `sol_batch_size` trajectories; the learned part of the
    # coarse-to-fine upsampling takes `sol_upsample_steps` Adam steps. The coarse grid's own step bound
    # caps rho dt at `sol_coarse_max_rho_dt` (the reaction is integrated exactly: the cap only bounds the
    # splitting error, which the correction learns; measured: no change of the plain coarse error
    # between 0.2 and 1.0 on the 4 mm demo grid)
    sol_step_days=40.0, sol_steps=3, sol_train_steps=5, sol_draws=6, sol_epochs=30, sol_batch_size=4, sol_hidden=16,
    sol_upsample_steps=300, sol_coarse_max_rho_dt=1.0,
    # both corrections act where sol_active_eps < u < 1 - sol_active_eps (their gate 4 u (1 - u) is below
    # 4 sol_active_eps elsewhere); the forecast's cost grows with that shell's size (measured at 2 mm:
    # 1e-2 instead of 1e-4 halves the shell, same errors and Dice)
    sol_active_eps=1e-2,
    # the learned upsampler's hidden width: it runs on every fine voxel of the front, the forecast's
    # largest cost (measured at 2 mm: 8 instead of 16 halves that cost; held-out squared error of
    # the upsampling 252 vs 231, trilinear alone 694)
    sol_up_hidden=8,
    # the amortised parameter network keeps its own budget: full-batch epochs over the training subjects
    # (train_param_net runs 4 x amortised_epochs steps)
    amortised_epochs=12,
    # radiotherapy (the subject's treatment table, ``treatment``): the linear-quadratic kill uses this
    # population radiosensitivity (1/Gy) and alpha/beta (Gy), not the subject's (unknown in a clinic;
    # the virtual cohort draws it per patient from synth.glioma.RT_ALPHA_RANGE, whose geometric mean
    # this is)
    rt_alpha=0.012, rt_alpha_beta_gy=10.0,
)
SLOPPY = dict(restarts=1, fit_iterations=25, epochs=2, sol_epochs=4, amortised_epochs=6, sol_train_steps=3, sol_draws=2,
              sol_upsample_steps=40)

DW_BOUNDS = (0.01, 1.0)
# the prior (literature) ranges of the parameters, DATA.md: D_w 0.035-0.3 mm^2/day, rho 0.01-0.2 /day
# with a Fisher front speed 2 sqrt(D_w rho) of 0.04-0.1 mm/day: the lesion growth of untreated
# glioblastoma before surgery (median 0.18 ml/day, Ellingson et al. 2016, Cancer 122:1718) bounds
# the front speed of a 30 mm lesion to about 0.1 mm/day (the virtual cohort, synth.glioma, draws
# from the same ranges for the same reason). The solver-in-the-loop draws its training parameters
# from them and feeds its network log(D_w), log(rho) scaled to [0, 1] over them (``prior_unit``).
PRIOR_DW_RANGE = (0.035, 0.3)
PRIOR_RHO_RANGE = (0.01, 0.2)
PRIOR_SPEED_RANGE = (0.04, 0.1)
RHO_BOUNDS = (0.005, 0.5)
T0_BOUNDS = (1.0, 1500.0)


def settings(config: dict) -> dict:
    return resolve(config, "glioma")


def prior_unit(value, prior_range):
    """log(value) mapped linearly onto [0, 1] over the prior range (values outside extrapolate)."""
    lo, hi = np.log(prior_range[0]), np.log(prior_range[1])
    log = np.log(value) if not hasattr(value, "log") else value.log()
    return (log - lo) / (hi - lo)


def from_prior_unit(z, prior_range):
    """Inverse of ``prior_unit``."""
    lo, hi = np.log(prior_range[0]), np.log(prior_range[1])
    x = lo + z * (hi - lo)
    return np.exp(x) if not hasattr(x, "exp") else x.exp()


def draw_prior(rng) -> tuple[float, float]:
    """(D_w, rho) log-uniform over the prior ranges, redrawn until the front speed is in range."""
    while True:
        dw = float(np.exp(rng.uniform(*np.log(PRIOR_DW_RANGE))))
        rho = float(np.exp(rng.uniform(*np.log(PRIOR_RHO_RANGE))))
        if PRIOR_SPEED_RANGE[0] <= 2.0 * np.sqrt(dw * rho) <= PRIOR_SPEED_RANGE[1]:
            return dw, rho


@dataclasses.dataclass
class GliomaFit:
    dw: float
    rho: float
    t0: float
    theta_t1gd: float
    theta_flair: float
    center: tuple[float, float, float]
    loss: float = float("nan")
    seconds: float = 0.0
    sd_log: dict = dataclasses.field(default_factory=dict)

    def parameters(self) -> dict:
        out = dict(dw=self.dw, rho=self.rho, t0_days=self.t0, theta_t1gd=self.theta_t1gd,
                   theta_flair=self.theta_flair, seed_voxel=list(self.center), calibration_loss=self.loss,
                   calibration_seconds=self.seconds)
        out.update({f"{k}_log_sd": v for k, v in self.sd_log.items()})
        return out


def seed_center(t1gd: np.ndarray, flair: np.ndarray) -> tuple[float, float, float]:
    mask = t1gd if t1gd.any() else flair
    if not mask.any():
        raise InputError("no tumour voxel in the first session to seed the model from")
    return tuple(float(c) for c in np.argwhere(mask).mean(axis=0))


def initial_density(shape, spacing, center, s: dict) -> np.ndarray:
    from neurohybrid.solvers.glioma import gaussian_seed

    return gaussian_seed(shape, spacing, center, sigma_mm=float(s["seed_sigma_mm"]), amplitude=1.0).astype(np.float32)


def simulate(wm, gm, u0, spacing, dw, rho, times, s: dict, treatment=None, t0: float = 0.0, box=None) -> list[np.ndarray]:
    """Numba solver states at the given (sorted, > 0) model times.

    treatment (``treatment.Treatment``, days since the first session): its fractions are given at
    model time t0 + day, inside their targets cut to ``box`` (the grid of wm/gm within the inputs'
    crop). Without fractions before times[-1] this is one plain solver call, as for an untreated
    subject; with them, one call per run of fractions of equal dose and target."""
    from neurohybrid.solvers.glioma import simulate_glioma

    times = [float(t) for t in times]
    kw = dict(spacing=spacing, dw=dw, rho=rho, dg_ratio=float(s["dg_ratio"]), max_rho_dt=float(s["max_rho_dt"]),
              threads=int(s["threads"]))
    if not treatment or not treatment.within(-t0, times[-1] - t0):
        return simulate_glioma(wm, gm, u0, days=times[-1], save_days=times, **kw)
    # cut the run where the dose or target changes; each piece saves its own requested times
    cuts = [0.0] + [t0 + c for c in treatment.segments(-t0, times[-1] - t0)] + [times[-1]]
    out, u = [], u0
    for a, b in zip(cuts[:-1], cuts[1:]):
        save = [t - a for t in times if a < t <= b]
        rt = treatment.radiotherapy(0.0, a - t0, b - t0, box)
        states = simulate_glioma(wm, gm, u, days=b - a, save_days=save + [b - a], radiotherapy=rt, **kw)
        out.extend(states[:-1])
        u = states[-1]
    return out


def soft_dice_np(p: np.ndarray, m: np.ndarray) -> float:
    return 1.0 - 2.0 * float((p * m).sum()) / (float(p.sum() + m.sum()) + 1e-6)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibrate(wm, gm, t1gd, flair, days, spacing, s: dict, *, fixed: dict | None = None, seed: int = 0,
              treatment=None) -> GliomaFit:
    """Fit (D_w, rho, t0[, thresholds]) to the sessions' masks t1gd/flair (S, X, Y, Z) at `days`.

    fixed: {'dw':..., 'rho':...} to fit only t0 (used by the amortised families, whose network gives
    D_w and rho). treatment: the fractions given before the last of `days` act in every simulation
    (days since the first of `days`)."""
    from neurohybrid.hybrid.calibration import Bounds, calibrate_derivative_free, restart_spread

    start = time.perf_counter()
    t1gd, flair = np.asarray(t1gd, bool), np.asarray(flair, bool)
    days = np.asarray(days, float) - float(days[0])
    center = seed_center(t1gd[0], flair[0])
    box = voxel.tumour_box(list(flair) + list(t1gd), wm.shape, int(s["calib_margin"]))
    wm_b, gm_b = np.ascontiguousarray(wm[box], np.float32), np.ascontiguousarray(gm[box], np.float32)
    c_box = tuple(c - sl.start for c, sl in zip(center, box))
    u0 = initial_density(wm_b.shape, spacing, c_box, s)
    obs_t1, obs_fl = t1gd[(slice(None),) + box].astype(np.float32), flair[(slice(None),) + box].astype(np.float32)
    tau = float(s["soft_tau"])
    fit_thr = bool(s["fit_thresholds"]) and fixed is None
    prior_w = float(s["prior_weight"])
    lp_dw, lp_rho = np.log(float(s["prior_dw"])), np.log(float(s["prior_rho"]))

    # initial t0 from the front speed of the prior parameters and the first FLAIR radius
    vol = float(flair[0].sum() or t1gd[0].sum()) * float(np.prod(spacing))
    radius = (3.0 * vol / (4.0 * np.pi)) ** (1.0 / 3.0)

    def unpack(theta):
        theta = list(theta)
        if fixed is not None:
            dw, rho, t0 = float(fixed["dw"]), float(fixed["rho"]), theta[0]
            th1, thf = float(s["theta_t1gd"]), float(s["theta_flair"])
        else:
            dw, rho, t0 = theta[:3]
            th1, thf = (theta[3], theta[4]) if fit_thr else (float(s["theta_t1gd"]), float(s["theta_flair"]))
        return dw, rho, t0, th1, min(thf, th1 - 0.05)

    def loss(theta):
        dw, rho, t0, th1, thf = unpack(theta)
        try:
            states = simulate(wm_b, gm_b, u0, spacing, dw, rho, t0 + days, s, treatment, t0, box)
        except InputError:
            return np.inf
        val = 0.0
        for k, u in enumerate(states):
            val += soft_dice_np(_sigmoid((u - th1) / tau), obs_t1[k]) + soft_dice_np(_sigmoid((u - thf) / tau), obs_fl[k])
        val /= len(states)
        if fixed is None:
            val += prior_w * ((np.log(dw) - lp_dw) ** 2 + (np.log(rho) - lp_rho) ** 2)
        return val

    if fixed is not None:
        speed = 2.0 * np.sqrt(float(fixed["dw"]) * float(fixed["rho"]))
        init = [float(np.clip(radius / speed + 2.0 / float(fixed["rho"]), *T0_BOUNDS))]
        bounds = Bounds([T0_BOUNDS[0]], [T0_BOUNDS[1]], [True])
    else:
        dw0, rho0 = float(s["prior_dw"]), float(s["prior_rho"])
        t00 = float(np.clip(radius / (2.0 * np.sqrt(dw0 * rho0)) + 2.0 / rho0, *T0_BOUNDS))
        lo, hi, logs = [DW_BOUNDS[0], RHO_BOUNDS[0], T0_BOUNDS[0]], [DW_BOUNDS[1], RHO_BOUNDS[1], T0_BOUNDS[1]], [True] * 3
        init = [dw0, rho0, t00]
        if fit_thr:
            lo += [0.4, 0.1]
            hi += [0.95, 0.4]
            logs += [False, False]
            init += [float(s["theta_t1gd"]), float(s["theta_flair"])]
        bounds = Bounds(lo, hi, logs)
    # restarts near the informed start (the budget is a few dozen solver runs); their spread is the
    # uncertainty reported below
    result = calibrate_derivative_free(loss, bounds, init=init, n_restarts=int(s["restarts"]),
                                       max_evals=int(s["fit_iterations"]), start_spread=0.15, seed=seed)
    dw, rho, t0, th1, thf = unpack(result.theta)
    names = ["t0"] if fixed is not None else ["dw", "rho", "t0"] + (["theta_t1gd", "theta_flair"] if fit_thr else [])
    sd_log = {n: float(v) for n, v in zip(names, restart_spread(result, 0.05, log=bounds.log))}
    return GliomaFit(float(dw), float(rho), float(t0), float(th1), float(thf), center, float(result.loss),
                     time.perf_counter() - start, sd_log)


def calibrate_inputs(inputs, s: dict, *, fixed: dict | None = None, seed: int = 0) -> GliomaFit:
    """``calibrate`` on the subject's input sessions, done once per subject's inputs (``inputs.shared``):
    the mechanistic, residual, ude, sol and sol_precomputed families of a forecast job, and the
    training of the fold's families, start from the same fits."""
    a = inputs.arrays
    rt = Treatment.of(inputs, s)

    def compute():
        return calibrate(a["wm"], a["gm"], a["t1gd"], a["flair"], inputs.meta["days"], tuple(inputs.meta["voxel_mm"]), s,
                         fixed=fixed, seed=seed, treatment=rt)

    return inputs.shared.get("glioma.calibrate", (s, fixed, int(seed), rt.key()), compute)


def state_at(inputs, fit: GliomaFit, rel_days: list[float], s: dict) -> list[np.ndarray]:
    """Model states on the whole crop at days relative to the first session (solved once per subject's
    inputs and fit, ``inputs.shared``: the hybrids of a forecast job all start from the fitted state at
    the last session; each caller gets its own copy), under the subject's recorded treatment."""

    def compute():
        a = inputs.arrays
        spacing = tuple(inputs.meta["voxel_mm"])
        u0 = initial_density(a["wm"].shape, spacing, fit.center, s)
        return simulate(a["wm"], a["gm"], u0, spacing, fit.dw, fit.rho, [fit.t0 + float(d) for d in rel_days], s, rt, fit.t0)

    rt = Treatment.of(inputs, s)
    states = inputs.shared.get("glioma.state_at", (dataclasses.asdict(fit), [float(d) for d in rel_days], s, rt.key()),
                               compute)
    return [u.copy() for u in states]


def forecast_days(inputs) -> tuple[float, float]:
    """(day of the last input session, day to forecast), both relative to the first session."""
    d0 = float(inputs.meta["days"][0])
    return float(inputs.meta["days"][-1]) - d0, float(inputs.meta["target_day"]) - d0
