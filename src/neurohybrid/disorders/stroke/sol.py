"""Solver in the loop for the Xue 2021 tissue-death model (the ``sol`` / ``sol_precomputed`` families).

Fine solver (the reference): the Numba RK4 ``solvers.stroke.simulate_tissue_death`` at ``fine_dt_s``.
Coarse solver: ``CoarseXueStep``, one linearly implicit step of ``sol_step_hours`` (24 h; unconditionally
stable; RK4 is unstable beyond ~20 min): T implicit in its decay, the living fraction by backward Euler
(``sol_coarse_scheme`` "euler"; relative error of D at follow-up ~7% on the benchmark's cases,
Dice of the final mask down to 0 for small infarcts). The "exact" scheme (exp(-kf T dt)) is within
~1e-3 of the fine solver even at one step per flow segment: nothing left to correct, so it is not
the SOL set-up (kept for the record). Each segment of constant flow (onset to reperfusion, then
reperfusion to follow-up) is cut into ceil(length / sol_step_hours) equal steps, so a step is at
most the training step; its length is an input of the step and of the correction (``dt / step``).

State per voxel u = [D, A, D0, A0] (the solver's (M, 4N) layout, N voxels per block):
* A = T (1 - D), the toxin in living tissue: what drives death (dD/dt = kf A). The toxin T of dead
  tissue drives nothing (every rate carries 1 - D), and the coarse step's T overshoots there (T
  keeps being produced within a step in which the tissue dies): with [D, T] that irrelevant error
  was ~2000x the error of D in the training loss (mean squared error over the state), which no
  gated correction can (or should) undo. The coarse step recovers T = A / (1 - D).
* D0, A0: the state at the start of the step just taken (the coarse step copies its input there;
  the correction leaves them alone). The coarse step's error is a function of where the step
  started, not of where it ended: a long semi-implicit step relaxes T to its equilibrium and
  forgets T0 (the toxin at onset or just before reperfusion), which sets the error of the step
  (a 5-nearest-neighbour regression of the one-step error of D on the end state explains R^2 ~ 0.4
  of it, on the start state 0.97). Um et al.'s correction sees the coarse solver's output; here
  that output carries the step's start.
Covariates (M, N, 2) = [H, dt / sol_step_hours], H the hypoxic fraction of the flow the voxel
sees (CBF / sigma before reperfusion, normal CBF / sigma after; it carries sigma and the tissue).

Physics of the correction (``CorrectedSolver(..., state_range=state_range, gate=sol_gate)``):

* gate g = (1 - D0) * s / (s + DRIVE_EPS), s = H + A0 / T_MAX, on D and A (0 on D0, A0): exactly
  zero where there is no disease (H = 0 and no toxin: the coarse step keeps such tissue at
  D = A = 0) and in tissue that was dead at the step's start (D0 = 1: the model itself stops,
  every rate carries 1 - D); ~1 wherever the tissue is hypoperfused or carries toxin, so the
  correction acts at onset (D = 0) too. (Gated by the end state's 1 - D it could not undo the coarse
  step's overshoot of D towards 1 within a step.)
* clamp: D in [0, 1], A in [0, T_MAX]. T_MAX = sqrt(2 kt / kf) is a bound of the model itself:
  from onset, dT/dD <= kt / (kf T), so T^2 <= 2 (kt / kf) D <= 2 kt / kf; A <= T. The coarse step
  applies the same bound to T.
* inputs normalised: D, A / T_MAX, D0, A0 / T_MAX, H, (log10 H + 4) / 4 (H spans decades),
  dt / sol_step_hours, and the step's survival ratio (1 - D) / (1 - D0) = 1 / (1 + kf T' dt) of the
  backward-Euler step (its error within a step is a function of it; the input cut the held-out error
  of the corrected solver by ~25%).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from neurohybrid.solvers.stroke import XUE2021

T_MAX = math.sqrt(2.0 * XUE2021["kt"] / XUE2021["kf"])
DRIVE_EPS = 1e-3  # H + T / T_MAX at which the gate reaches 1/2 (candidate tissue has H > ~3e-3)
N_INPUTS = 8
BLOCKS = 4  # D, A, D0, A0


class CoarseXueStep:
    """One linearly implicit step of the Xue model: T implicit in its decay, then the living fraction
    by ``scheme``: "euler" (default, the coarse solver of the SOL families) backward Euler,
    (1 - D') = (1 - D) / (1 + kf T' dt); "exact" (1 - D') = (1 - D) exp(-kf T' dt), exact given T'.
    Both are unconditionally stable where explicit RK4 (kb dt < 2.8, dt < ~20 min) is not, and
    first-order accurate; "exact" is so accurate for this model (T relaxes to its equilibrium within
    minutes, after which D given T is all there is) that one step per constant-flow segment already
    reaches a relative error of D ~1e-3: nothing for a correction to learn. Backward Euler under-
    estimates death within a step (1 / (1 + x) > exp(-x)): a systematic error (~7% of D at 24 h
    steps) that the correction learns. ``hours`` is the reference (training) step; the step taken is
    ``hours * covariates[..., 1]``. State u (M, 4N) = [D, A, D0, A0] -> [D', A', D, A]; covariates
    (M, N, 2) = [H, dt / hours]."""

    def __init__(self, hours, scheme="euler"):
        if scheme not in ("euler", "exact"):
            raise ValueError(f"unknown coarse scheme {scheme!r} (euler, exact)")
        self.hours = float(hours)
        self.scheme = scheme

    def __call__(self, u, covariates):
        p = XUE2021
        m, n4 = u.shape
        n = n4 // BLOCKS
        cov = covariates.expand(m, n, covariates.shape[-1])
        h, dt = cov[..., 0], cov[..., 1] * (self.hours * 3600.0)
        alive = 1.0 - u[:, :n]
        tox = torch.clamp(u[:, n:2 * n] / torch.clamp(alive, min=1e-12), max=T_MAX)
        tox = (tox + dt * p["kt"] * h * alive) / (1.0 + dt * p["kb"] * (1.0 - h) * alive)
        tox = torch.clamp(tox, max=T_MAX)
        if self.scheme == "exact":
            alive = alive * torch.exp(-dt * p["kf"] * tox)
        else:
            alive = alive / (1.0 + dt * p["kf"] * tox)
        return torch.cat([1.0 - alive, tox * alive, u[:, :2 * n]], dim=1)


class SolCorrection(nn.Module):
    """The SOL state correction h(u, covariates) -> (M, 4N): one MLP shared by every voxel (the model is
    per voxel), of the normalised (D, A / T_MAX, D0, A0 / T_MAX, H, log H, dt / step). Outputs in
    state units: ``scale`` per unit output for D, ``scale * T_MAX`` for A, 0 for D0, A0.
    Zero-initialised: an untrained model is the plain coarse solver."""

    def __init__(self, hidden=16, scale=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_INPUTS, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = float(scale)

    def forward(self, u, covariates, lap=None):
        m, n4 = u.shape
        n = n4 // BLOCKS
        cov = covariates.expand(m, n, covariates.shape[-1])
        h = cov[..., 0]
        logh = (torch.log10(torch.clamp(h, min=1e-4)) + 4.0) / 4.0
        # the step's survival ratio (1 - D) / (1 - D0): the coarse step's death exponent x as 1 / (1 + x),
        # in [0, 1] (the error of the backward-Euler step within a step is a function of it)
        surv = torch.clamp((1.0 - u[:, :n]) / torch.clamp(1.0 - u[:, 2 * n:3 * n], min=1e-6), 0.0, 1.0)
        x = torch.stack([u[:, :n], u[:, n:2 * n] / T_MAX, u[:, 2 * n:3 * n], u[:, 3 * n:] / T_MAX, h, logh, cov[..., 1],
                         surv], dim=-1)
        out = self.scale * self.net(x)
        return torch.cat([out[..., 0], T_MAX * out[..., 1], torch.zeros_like(u[:, 2 * n:])], dim=1)


def sol_gate(u, covariates):
    """(1 - D0) s / (s + DRIVE_EPS), s = H + A0 / T_MAX, on D and A; 0 on D0, A0 (module docstring)."""
    m, n4 = u.shape
    n = n4 // BLOCKS
    h = covariates.expand(m, n, covariates.shape[-1])[..., 0]
    drive = h + u[:, 3 * n:] / T_MAX
    g = torch.clamp(1.0 - u[:, 2 * n:3 * n], min=0.0) * drive / (drive + DRIVE_EPS)
    return torch.cat([g, g, torch.zeros_like(g), torch.zeros_like(g)], dim=1)


def state_range(u, covariates=None):
    """D in [0, 1], A in [0, T_MAX] (D0, A0 likewise)."""
    n = u.shape[1] // BLOCKS
    one = torch.ones(n, dtype=u.dtype, device=u.device)
    return 0.0, torch.cat([one, T_MAX * one, one, T_MAX * one])


def corrected_solver(step_hours: float, hidden: int, device="cpu", scheme="euler"):
    from neurohybrid.hybrid.solver_in_loop import CorrectedSolver

    return CorrectedSolver(CoarseXueStep(step_hours, scheme), SolCorrection(hidden).to(device), state_range=state_range, gate=sol_gate)


# ---------------------------------------------------------------------------------------------
# voxels, segments, the three solvers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Voxels:
    """The tissue a forecast simulates: CBF and WM fraction of its candidate voxels, reperfusion time
    (None: never, or not before follow-up) and follow-up time (h since onset)."""

    cbf: np.ndarray
    wm: np.ndarray
    rep: float | None
    hours: float
    name: str = ""

    @classmethod
    def of(cls, inputs, s: dict) -> "Voxels":
        from neurohybrid.disorders.stroke import mechanistic as mech

        a, m = inputs.arrays, inputs.meta
        cand = mech.candidates(inputs, s)
        rep = m["reperfusion_h"]
        hours = float(m["hours_followup"])
        rep = None if rep is None or float(rep) >= hours else float(rep)
        return cls(np.asarray(a["cbf"][cand], np.float64), np.clip(a["wm"][cand], 0, 1).astype(np.float64), rep, hours,
                   inputs.subject)

    def subset(self, idx) -> "Voxels":
        return dataclasses.replace(self, cbf=self.cbf[idx], wm=self.wm[idx])


def flows(vox: Voxels, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The flow the model sees before and after reperfusion: CBF / sigma, normal CBF / sigma."""
    from neurohybrid.solvers.stroke import normal_cbf

    return vox.cbf / sigma, normal_cbf(vox.wm) / sigma


def segments(vox: Voxels, sigma: float, step_hours: float) -> list[tuple[float, float, int, np.ndarray, np.ndarray]]:
    """(t0, t1, steps, H, flow) of each constant-flow segment: onset to reperfusion (or follow-up),
    then reperfusion to follow-up; steps = ceil(length / step_hours) equal steps."""
    from neurohybrid.solvers.stroke import hypoxic_fraction

    before, after = flows(vox, sigma)
    spans = [(0.0, vox.rep if vox.rep is not None else vox.hours, before)]
    if vox.rep is not None:
        spans.append((vox.rep, vox.hours, after))
    return [(t0, t1, max(1, math.ceil((t1 - t0) / step_hours - 1e-9)), hypoxic_fraction(f, vox.wm), f)
            for t0, t1, f in spans if t1 > t0]


def coarse_dead(model, vox: Voxels, sigma: float, *, corrected: bool = True, device="cpu") -> torch.Tensor:
    """D at follow-up by the coarse solver, with (corrected) or without the learned correction."""
    ref = model.coarse_step.hours
    n = vox.cbf.size
    u = torch.zeros(1, BLOCKS * n, device=device)
    saved = model.use_correction
    model.use_correction = bool(saved and corrected)
    try:
        for t0, t1, steps, h, _ in segments(vox, sigma, ref):
            dt = (t1 - t0) / steps / ref
            cov = torch.stack([torch.as_tensor(h, dtype=torch.float32, device=device),
                               torch.full((n,), dt, dtype=torch.float32, device=device)], dim=-1)[None]
            model.set_context(cov)
            for _ in range(steps):
                u = model.step(u)
    finally:
        model.use_correction = saved
    return u[0, :n]


def fine_dead(vox: Voxels, sigma: float, s: dict) -> np.ndarray:
    """D at follow-up by the fine solver (RK4 at ``fine_dt_s``), the reference."""
    from neurohybrid.disorders.stroke import mechanistic as mech

    return mech.simulate(vox.cbf, vox.wm, sigma, vox.hours, vox.rep, s, dt_s=float(s["fine_dt_s"]))


def dead_error(d, d_fine) -> float:
    """Relative L2 error of the dead fraction (the SOL error metric)."""
    d, d_fine = np.asarray(d, np.float64), np.asarray(d_fine, np.float64)
    return float(np.linalg.norm(d - d_fine) / max(np.linalg.norm(d_fine), 1e-12))


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


ERROR_METRIC = "relative L2 error of the dead fraction at follow-up on the candidate voxels vs the fine RK4 solver (dt {fine} s)"


def dead_horizon_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``fit_correction``'s validation error: relative L2 of D (the first block of the state) after the
    last step (K steps: the horizon), what the forecast reports. (Over every step, a correction that
    fixed the large one-step errors of the transients passed validation while adding ~2e-3 of noise
    to D at follow-up, 2-10x the plain coarse error of the benchmark's held-out cases.)"""
    n = pred.shape[-1] // BLOCKS
    return float(torch.linalg.vector_norm(pred[:, -1, :n] - target[:, -1, :n])
                 / torch.clamp(torch.linalg.vector_norm(target[:, -1, :n]), min=1e-12))


# ---------------------------------------------------------------------------------------------
# training data: fine trajectories over the whole forecast horizon, sigma drawn from its range
# ---------------------------------------------------------------------------------------------

# onset-to-reperfusion times of the training columns, h: the generator's range (imaging 1-6 h, then
# 0.5-8 h; ``synth.stroke``), widened at both ends
REPERFUSION_RANGE_H = (0.5, 16.0)
REPERFUSION_DRAWS = 8  # reperfusion times per member (columns share them: one fine solve per time)


def horizon_steps(voxels: list[Voxels], step_hours: float) -> int:
    """K: the most coarse steps of any constant-flow segment of the forecasts of these subjects
    (never reperfused: onset to follow-up)."""
    return max(max(1, math.ceil(v.hours / step_hours - 1e-9)) for v in voxels)


def fine_trajectories(voxels: list[Voxels], s: dict, seed: int, *, draws: int | None = None,
                      n_voxels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Training members for ``fit_correction``: one member per (subject, sigma draw).

    sigma is drawn log-uniformly over [sens_min, sens_max] (the range the calibration can return),
    ``sol_draws`` times per subject. Each member holds ``sol_train_voxels`` columns: voxels drawn from
    the subject's candidates, each in one of the three kinds of constant-flow segment a forecast
    solves (a third each): onset to follow-up never reperfused; onset to a reperfusion time; that
    reperfusion time to follow-up (from the fine state there, under the restored flow). The
    reperfusion times are drawn per member (REPERFUSION_DRAWS, uniformly in REPERFUSION_RANGE_H), so that the segments'
    step lengths (ceil(length / sol_step_hours) equal steps, as in the forecast) cover those of any
    subject, not only the training subjects' own. Each column is simulated by the fine solver and
    saved at its coarse step times for K steps (K = ``horizon_steps``: the whole horizon of the
    longest segment; shorter segments run on under the same flow). Returns fine (B, K+1, 4n) = [D, A, D0, A0],
    covariates (B, n, 2) = [H, dt / step], and one dict per member (subject, sigma)."""
    from neurohybrid.solvers.stroke import hypoxic_fraction, simulate_tissue_death

    rng = np.random.default_rng(seed)
    step = float(s["sol_step_hours"])
    draws = int(s["sol_draws"]) if draws is None else int(draws)
    n_vox = int(s["sol_train_voxels"]) if n_voxels is None else int(n_voxels)
    k = horizon_steps(voxels, step)
    lo, hi = math.log(float(s["sens_min"])), math.log(float(s["sens_max"]))
    fines, covs, info = [], [], []

    def run(flow, wm, hours, save=None, d0=None, t0=None):
        return simulate_tissue_death(flow, hours=hours, wm_fraction=wm, dt_s=float(s["fine_dt_s"]), save_hours=save,
                                     dead0=d0, toxic0=t0, threads=int(s["threads"]))

    def n_steps(length):
        return max(1, math.ceil(length / step - 1e-9))

    for vox in voxels:
        if vox.cbf.size == 0:
            continue
        for _ in range(draws):
            sigma = float(math.exp(rng.uniform(lo, hi)))
            sub = vox.subset(rng.choice(vox.cbf.size, n_vox, replace=vox.cbf.size < n_vox))
            before, after = flows(sub, sigma)
            kind = rng.integers(0, 3, n_vox)  # 0: never reperfused, 1: before, 2: after reperfusion
            reps = np.minimum(rng.uniform(*REPERFUSION_RANGE_H, REPERFUSION_DRAWS), 0.9 * vox.hours)
            which = rng.integers(0, REPERFUSION_DRAWS, n_vox)
            d_all, t_all = np.zeros((k + 1, n_vox)), np.zeros((k + 1, n_vox))
            dts = np.zeros(n_vox)
            h_col = np.where(kind == 2, hypoxic_fraction(after, sub.wm), hypoxic_fraction(before, sub.wm))
            groups = [(0, vox.hours, np.flatnonzero(kind == 0))]
            for j, rep in enumerate(reps):
                groups += [(1, rep, np.flatnonzero((kind == 1) & (which == j))),
                           (2, rep, np.flatnonzero((kind == 2) & (which == j)))]
            for kd, rep, cols in groups:  # one fine solve per group of columns with the same times
                if cols.size == 0:
                    continue
                d0 = t0 = None
                if kd == 2:
                    at_rep = run(before[cols], sub.wm[cols], rep)
                    d0, t0 = at_rep["dead"], at_rep["toxic"]
                    d_all[0, cols], t_all[0, cols] = d0, t0
                length = vox.hours - rep if kd == 2 else rep
                dt = length / n_steps(length)
                out = run(after[cols] if kd == 2 else before[cols], sub.wm[cols], dt * k, [dt * j for j in range(1, k + 1)],
                          d0, t0)
                d_all[1:, cols], t_all[1:, cols] = out["dead"], out["toxic"]
                dts[cols] = dt
            a_all = t_all * (1.0 - d_all)  # A = T (1 - D)
            prev = np.r_[[0], np.arange(k)]  # the state at the start of each step (step 0: the start itself)
            fines.append(np.concatenate([d_all, a_all, d_all[prev], a_all[prev]], axis=1))
            covs.append(np.stack([h_col, dts / step], axis=1))
            info.append(dict(subject=vox.name, sigma=sigma))
    if not fines:
        from neurohybrid.errors import InputError

        raise InputError("no training subject has candidate voxels: nothing to train the SOL correction on")
    return (torch.as_tensor(np.stack(fines), dtype=torch.float32), torch.as_tensor(np.stack(covs), dtype=torch.float32), info)
