"""Ischaemic tissue death driven by perfusion (Xue et al. 2021, J Biomech 110705) and the
penumbra-propagation variant (after Xue et al. 2022).

Per voxel, with F the cerebral blood flow (CBF, ml/100 ml/min):

    H(F)  = 1 - 1 / (1 + exp(-2 (k1 F_eff + k2)))      hypoxic fraction, F_eff = F * m(w)
    dT/dt = kt H (1 - D) - kb T (1 - H)(1 - D)          toxic state (dimensionless)
    dD/dt = kf T (1 - D)                                dead fraction

Rates are per second inside the kernels; the API speaks hours. White matter has a lower normal
CBF (21 vs 56 in grey matter) for the same oxygen supply, so Xue et al. multiply WM perfusion by
2.6998 before H. For a voxel with WM probability w we use the linear blend
m(w) = 1 + (2.6998 - 1) w (w = 0: grey matter, w = 1: white matter); with the normal values
both tissues then sit at F_eff ~ 56-57, where H ~ 2e-6 and practically nothing dies.

Reperfusion: at ``reperfusion_h`` F switches to ``cbf_after`` (default the normal value of the
voxel's tissue, 56 (1 - w) + 21 w). The time grid always lands on the reperfusion time and on the
save times, so the piecewise-constant H is integrated exactly (classical RK4, fixed step dt_s,
default 60 s: kb dt ~ 0.13, relative local error ~ 1e-7).

Penumbra variant (``simulate_penumbra``). Xue et al. 2022 let the toxic state spread from the
core into neighbouring tissue. We implement it as isotropic diffusion of T inside the brain mask,

    dT/dt = kt H (1 - D) - kb T (1 - H)(1 - D) + div(D_T grad T),   zero flux at the mask border,

with D_T (``toxic_diffusivity``, mm^2/s) a uniform model parameter: the default 1e-4 mm^2/s (diffusion
length sqrt(2 D_T t) ~ 4 mm per day) is our assumption, to be calibrated, not a published value.
With D_T = 0 it is exactly the per-voxel model. Finite differences: 7-point stencil with
the voxel spacing in mm (faces to voxels outside the mask carry no flux); the RK4 step is limited to the explicit
stability bound dt <= 0.9 * 2.78 / (4 D_T sum 1/h^2 + kb).

``simulate_tissue_death_torch`` is the twin (same RK4 grid, float32/float64, any device);
``darcy_perfusion`` lives in ``neurohybrid.solvers.perfusion`` (which reads this module's normal CBF).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from neurohybrid.errors import InputError

XUE2021 = dict(k1=0.175, k2=-3.304, kf=4.4719e-4, kt=3.9441e-4, kb=2.15699e-3, wm_factor=2.6998)
NORMAL_CBF_GM = 56.0
NORMAL_CBF_WM = 21.0
CORE_THRESHOLD = 0.8  # D > 0.8 is infarct core (Xue et al. 2021)
RK4_STABILITY = 2.78  # classical RK4 is stable for |lambda| dt < 2.78 on the real axis
# The largest step whose accuracy was checked (disorders/stroke/mechanistic.py: |error of D| 4.5e-6
# at 900 s on the demo's voxels); steps above it are refused by `neurohybrid simulate stroke`.
MAX_DT_S = 900.0


def _as_field(value, shape, name):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(shape, float(arr))
    if arr.shape != tuple(shape):
        raise InputError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} has NaN or infinite values")
    return arr


def perfusion_multiplier(wm_fraction, params=XUE2021):
    """m(w) = 1 + (wm_factor - 1) w: the WM correction applied to CBF before H."""
    return 1.0 + (params["wm_factor"] - 1.0) * np.asarray(wm_fraction, dtype=np.float64)


def hypoxic_fraction(cbf, wm_fraction=0.0, params=XUE2021) -> np.ndarray:
    """H(F) in [0, 1] of CBF (ml/100 ml/min), with the white-matter correction."""
    f_eff = np.asarray(cbf, dtype=np.float64) * perfusion_multiplier(wm_fraction, params)
    x = -2.0 * (params["k1"] * f_eff + params["k2"])
    # 1 - 1/(1+e^x) = e^x/(1+e^x) = 1/(1+e^-x): the logistic of x, written without overflow
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def normal_cbf(wm_fraction=0.0) -> np.ndarray:
    w = np.asarray(wm_fraction, dtype=np.float64)
    return NORMAL_CBF_GM * (1.0 - w) + NORMAL_CBF_WM * w


def time_grid(hours, reperfusion_h=None, save_hours=None, dt_s=60.0):
    """Segments of the fixed-step integration: (end_s, phase, substeps, save_index) arrays.

    phase 0 = before reperfusion, 1 = after; save_index = -1 when the segment end is not a save
    time. The same grid drives the Numba kernels and the torch twin.
    """
    if not (hours > 0 and math.isfinite(hours)):
        raise InputError(f"simulated time must be positive, got {hours} h")
    saves = np.array([hours] if save_hours is None else save_hours, dtype=np.float64).ravel()
    if saves.size == 0 or np.any(saves < 0) or np.any(saves > hours + 1e-12) or np.any(np.diff(saves) < 0):
        raise InputError(f"save_hours must be non-decreasing within [0, {hours}] h")
    if reperfusion_h is not None and not (reperfusion_h >= 0 and math.isfinite(reperfusion_h)):
        raise InputError(f"reperfusion time must be >= 0 h, got {reperfusion_h}")
    if not dt_s > 0:
        raise InputError(f"dt_s must be positive, got {dt_s}")
    edges = sorted(set(np.round(saves * 3600.0, 9).tolist())
                   | ({round(reperfusion_h * 3600.0, 9)} if reperfusion_h is not None and reperfusion_h < hours else set()))
    # rounded as the edges are: unrounded, a reperfusion time whose seconds round down (3% of the
    # times with 2 decimals, e.g. 4.59 h) left the segment after it in phase 0 (no reperfusion)
    rep_s = math.inf if reperfusion_h is None else round(reperfusion_h * 3600.0, 9)
    ends, phases, steps, save_idx = [], [], [], []
    t = 0.0
    for e in edges:
        gap = e - t
        ends.append(e)
        phases.append(0 if t < rep_s else 1)
        steps.append(0 if gap <= 0 else max(1, int(math.ceil(gap / dt_s - 1e-9))))
        save_idx.append(-1)
        t = e
    # map each save time (duplicates allowed) to its segment
    lookup = {e: i for i, e in enumerate(ends)}
    save_segment = np.array([lookup[round(s * 3600.0, 9)] for s in saves], dtype=np.int64)
    return (np.array(ends), np.array(phases, dtype=np.int64), np.array(steps, dtype=np.int64), save_segment)


# ---------------------------------------------------------------------------------------------
# Numba kernels


@njit(cache=True, inline="always")
def _local_rhs(d, tox, hyp, kf, kt, kb):
    alive = 1.0 - d
    return kf * tox * alive, (kt * hyp - kb * tox * (1.0 - hyp)) * alive


@njit(cache=True, parallel=True)
def _tissue_death_kernel(h_before, h_after, seg_end, seg_phase, seg_steps, kf, kt, kb, d0, tox0, seg_d, seg_t):
    """Per voxel RK4 over the segments; seg_d/seg_t (S, V) receive the state at each segment end."""
    nvox = h_before.shape[0]
    nseg = seg_end.shape[0]
    for v in prange(nvox):
        d = d0[v]
        tox = tox0[v]
        t = 0.0
        for s in range(nseg):
            hyp = h_before[v] if seg_phase[s] == 0 else h_after[v]
            ns = seg_steps[s]
            if ns > 0:
                h = (seg_end[s] - t) / ns
                for _ in range(ns):
                    a1, b1 = _local_rhs(d, tox, hyp, kf, kt, kb)
                    a2, b2 = _local_rhs(d + 0.5 * h * a1, tox + 0.5 * h * b1, hyp, kf, kt, kb)
                    a3, b3 = _local_rhs(d + 0.5 * h * a2, tox + 0.5 * h * b2, hyp, kf, kt, kb)
                    a4, b4 = _local_rhs(d + h * a3, tox + h * b3, hyp, kf, kt, kb)
                    d += h / 6.0 * (a1 + 2.0 * a2 + 2.0 * a3 + a4)
                    tox += h / 6.0 * (b1 + 2.0 * b2 + 2.0 * b3 + b4)
            t = seg_end[s]
            seg_d[s, v] = d
            seg_t[s, v] = tox


@njit(cache=True, nogil=True)
def _penumbra_rhs(d, tox, hyp, mask, coef, kf, kt, kb, out_d, out_t):
    """RHS on the grid: local kinetics + div(D_T grad T) with zero flux across the mask border.

    coef[a] = D_T / spacing[a]^2 (per second)."""
    nx, ny, nz = d.shape
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                if not mask[i, j, k]:
                    out_d[i, j, k] = 0.0
                    out_t[i, j, k] = 0.0
                    continue
                alive = 1.0 - d[i, j, k]
                c = tox[i, j, k]
                hp = hyp[i, j, k]
                lap = 0.0
                if i > 0 and mask[i - 1, j, k]:
                    lap += coef[0] * (tox[i - 1, j, k] - c)
                if i < nx - 1 and mask[i + 1, j, k]:
                    lap += coef[0] * (tox[i + 1, j, k] - c)
                if j > 0 and mask[i, j - 1, k]:
                    lap += coef[1] * (tox[i, j - 1, k] - c)
                if j < ny - 1 and mask[i, j + 1, k]:
                    lap += coef[1] * (tox[i, j + 1, k] - c)
                if k > 0 and mask[i, j, k - 1]:
                    lap += coef[2] * (tox[i, j, k - 1] - c)
                if k < nz - 1 and mask[i, j, k + 1]:
                    lap += coef[2] * (tox[i, j, k + 1] - c)
                out_d[i, j, k] = kf * c * alive
                out_t[i, j, k] = (kt * hp - kb * c * (1.0 - hp)) * alive + lap


def _penumbra_integrate(h_before, h_after, mask, coef, seg_end, seg_phase, seg_steps, kf, kt, kb, d, tox):
    """RK4 on the whole grid (stages need neighbours, so the time loop sits outside the voxels).

    Only the stencil is a Numba kernel (single-threaded: a parallel one compiles far slower and
    the penumbra model runs on lesion-sized grids); the stage updates are numpy expressions."""
    shape = d.shape
    kd = [np.empty(shape) for _ in range(4)]
    kt_ = [np.empty(shape) for _ in range(4)]
    dt_ = np.empty(shape)
    tt_ = np.empty(shape)
    seg_d, seg_t = [], []
    t = 0.0
    for s in range(seg_end.shape[0]):
        hyp = h_before if seg_phase[s] == 0 else h_after
        ns = int(seg_steps[s])
        if ns > 0:
            h = (seg_end[s] - t) / ns
            for _ in range(ns):
                _penumbra_rhs(d, tox, hyp, mask, coef, kf, kt, kb, kd[0], kt_[0])
                for stage, frac in ((1, 0.5), (2, 0.5), (3, 1.0)):
                    np.multiply(kd[stage - 1], frac * h, out=dt_)
                    dt_ += d
                    np.multiply(kt_[stage - 1], frac * h, out=tt_)
                    tt_ += tox
                    _penumbra_rhs(dt_, tt_, hyp, mask, coef, kf, kt, kb, kd[stage], kt_[stage])
                d += h / 6.0 * (kd[0] + 2.0 * kd[1] + 2.0 * kd[2] + kd[3])
                tox += h / 6.0 * (kt_[0] + 2.0 * kt_[1] + 2.0 * kt_[2] + kt_[3])
        t = seg_end[s]
        seg_d.append(d.copy())
        seg_t.append(tox.copy())
    return seg_d, seg_t


# ---------------------------------------------------------------------------------------------
# wrappers


def _threads(threads):
    from neurohybrid.solvers.network import _numba_threads

    return _numba_threads(threads)


def _hypoxia_fields(cbf, reperfusion_h, cbf_after, wm_fraction, params):
    cbf = np.asarray(cbf, dtype=np.float64)
    if not np.all(np.isfinite(cbf)):
        raise InputError("CBF has NaN or infinite values")
    if np.any(cbf < 0):
        raise InputError(f"CBF must be >= 0 ml/100 ml/min, found {cbf.min():.4g}")
    wm = _as_field(wm_fraction, cbf.shape, "wm_fraction")
    if np.any(wm < -1e-6) or np.any(wm > 1 + 1e-6):
        raise InputError("wm_fraction must lie in [0, 1]")
    wm = np.clip(wm, 0.0, 1.0)
    after = normal_cbf(wm) if cbf_after is None else _as_field(cbf_after, cbf.shape, "cbf_after")
    if np.any(after < 0):
        raise InputError("cbf_after must be >= 0 ml/100 ml/min")
    h_before = hypoxic_fraction(cbf, wm, params)
    h_after = hypoxic_fraction(after, wm, params) if reperfusion_h is not None else h_before
    return cbf, h_before, h_after


def _initial(value, shape, name):
    arr = _as_field(0.0 if value is None else value, shape, name)
    return np.array(arr, dtype=np.float64, order="C", copy=True)  # writable: one Numba signature


def _collect(seg_d, seg_t, save_segment, shape, save_hours):
    dead = [np.asarray(seg_d[i]).reshape(shape) for i in save_segment]
    toxic = [np.asarray(seg_t[i]).reshape(shape) for i in save_segment]
    if save_hours is None:
        return {"dead": dead[0], "toxic": toxic[0]}
    return {"dead": np.stack(dead), "toxic": np.stack(toxic)}


def simulate_tissue_death(cbf, *, hours, reperfusion_h=None, cbf_after=None, wm_fraction=0.0, params=XUE2021,
                          dt_s=60.0, save_hours=None, dead0=None, toxic0=None, threads=None) -> dict:
    """Xue 2021 per-voxel model for any array of CBF values (ml/100 ml/min).

    hours: simulated time since onset (h); reperfusion_h: time (h) when CBF becomes cbf_after
    (scalar or array; default the tissue's normal CBF); None = no reperfusion.
    wm_fraction: WM probability (scalar or array like cbf). dead0/toxic0: state at onset (default 0).
    Returns {"dead": D, "toxic": T} at ``hours`` (arrays shaped like cbf) or, with save_hours,
    stacked (S, *cbf.shape) at those times.
    """
    if dt_s * params["kb"] > RK4_STABILITY:
        # beyond it the toxin's decay blows up to inf (a "dead fraction" of -1e10 .. 1e14)
        raise InputError(f"dt_s {dt_s:g} s is beyond RK4's stability limit of {RK4_STABILITY / params['kb']:.0f} s")
    cbf, h_before, h_after = _hypoxia_fields(cbf, reperfusion_h, cbf_after, wm_fraction, params)
    seg_end, seg_phase, seg_steps, save_segment = time_grid(hours, reperfusion_h, save_hours, dt_s)
    shape = cbf.shape
    nvox = cbf.size
    seg_d = np.empty((seg_end.size, nvox))
    seg_t = np.empty((seg_end.size, nvox))
    with _threads(threads):
        _tissue_death_kernel(
            np.ascontiguousarray(h_before.ravel()), np.ascontiguousarray(h_after.ravel()), seg_end, seg_phase,
            seg_steps, float(params["kf"]), float(params["kt"]), float(params["kb"]),
            _initial(dead0, shape, "dead0").ravel(), _initial(toxic0, shape, "toxic0").ravel(), seg_d, seg_t,
        )
    return _collect(seg_d, seg_t, save_segment, shape, save_hours)


def penumbra_stable_dt(toxic_diffusivity, spacing, params=XUE2021) -> float:
    """Largest RK4 step (s) inside the explicit stability region, with a 10 % margin."""
    lam = 4.0 * toxic_diffusivity * sum(1.0 / float(s) ** 2 for s in spacing) + params["kb"]
    return 0.9 * 2.78 / lam


def simulate_penumbra(cbf, *, hours, mask=None, spacing=(1.0, 1.0, 1.0), toxic_diffusivity=1e-4,
                      reperfusion_h=None, cbf_after=None, wm_fraction=0.0, params=XUE2021, dt_s=60.0,
                      save_hours=None, threads=None) -> dict:
    """Spatial variant on a 3D CBF map: the toxic state also diffuses (D_T in mm^2/s) within mask.

    Same return value as ``simulate_tissue_death``; outside the mask D and T stay 0.
    """
    cbf = np.asarray(cbf, dtype=np.float64)
    if cbf.ndim != 3:
        raise InputError(f"the penumbra model needs a 3D CBF map, got shape {cbf.shape}")
    if not (toxic_diffusivity >= 0 and math.isfinite(toxic_diffusivity)):
        raise InputError(f"toxic_diffusivity must be >= 0 mm^2/s, got {toxic_diffusivity}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    mask = np.ones(cbf.shape, dtype=bool) if mask is None else np.array(mask, dtype=bool, order="C", copy=True)
    if mask.shape != cbf.shape:
        raise InputError(f"mask has shape {mask.shape}, expected {cbf.shape}")
    if not mask.any():
        raise InputError("brain mask is empty")
    cbf, h_before, h_after = _hypoxia_fields(cbf, reperfusion_h, cbf_after, wm_fraction, params)
    dt = min(dt_s, penumbra_stable_dt(toxic_diffusivity, spacing, params))
    seg_end, seg_phase, seg_steps, save_segment = time_grid(hours, reperfusion_h, save_hours, dt)
    coef = np.array([toxic_diffusivity / s**2 for s in spacing])
    d = np.zeros(cbf.shape)
    tox = np.zeros(cbf.shape)
    with _threads(threads):
        seg_d, seg_t = _penumbra_integrate(
            np.ascontiguousarray(h_before), np.ascontiguousarray(h_after), np.ascontiguousarray(mask), coef,
            seg_end, seg_phase, seg_steps, float(params["kf"]), float(params["kt"]), float(params["kb"]), d, tox,
        )
    return _collect(seg_d, seg_t, save_segment, cbf.shape, save_hours)


def infarct_core(dead, threshold=CORE_THRESHOLD) -> np.ndarray:
    """Boolean core mask D > threshold."""
    return np.asarray(dead) > threshold


# ---------------------------------------------------------------------------------------------
# torch twin


def simulate_tissue_death_torch(cbf, *, hours, reperfusion_h=None, cbf_after=None, wm_fraction=0.0, params=XUE2021,
                                dt_s=60.0, save_hours=None, device=None, dtype=None):
    """Torch twin of ``simulate_tissue_death``: the same RK4 grid, vectorised over voxels.

    cbf, cbf_after, wm_fraction and the entries of ``params`` may be tensors (gradients flow to
    them). Returns {"dead", "toxic"} tensors shaped like ``simulate_tissue_death``'s arrays.
    """
    import torch

    from neurohybrid.solvers.network import _torch_converter

    as_t, dev, dty = _torch_converter(cbf, device, dtype)

    f = as_t(cbf)
    w = as_t(wm_fraction)
    p = {k: as_t(v) for k, v in params.items()}
    mult = 1.0 + (p["wm_factor"] - 1.0) * w
    after = as_t(NORMAL_CBF_GM) * (1.0 - w) + as_t(NORMAL_CBF_WM) * w if cbf_after is None else as_t(cbf_after)

    def hyp(flow):
        return torch.sigmoid(-2.0 * (p["k1"] * flow * mult + p["k2"]))

    h_before = hyp(f) * torch.ones_like(f)
    h_after = (hyp(after) if reperfusion_h is not None else hyp(f)) * torch.ones_like(f)
    seg_end, seg_phase, seg_steps, save_segment = time_grid(hours, reperfusion_h, save_hours, dt_s)
    kf, kt, kb = p["kf"], p["kt"], p["kb"]

    def rhs(d, tox, hp):
        alive = 1.0 - d
        return kf * tox * alive, (kt * hp - kb * tox * (1.0 - hp)) * alive

    d = torch.zeros_like(h_before)
    tox = torch.zeros_like(h_before)
    seg_d, seg_t = [], []
    t = 0.0
    for s in range(seg_end.size):
        hp = h_before if seg_phase[s] == 0 else h_after
        ns = int(seg_steps[s])
        if ns > 0:
            h = (seg_end[s] - t) / ns
            for _ in range(ns):
                a1, b1 = rhs(d, tox, hp)
                a2, b2 = rhs(d + 0.5 * h * a1, tox + 0.5 * h * b1, hp)
                a3, b3 = rhs(d + 0.5 * h * a2, tox + 0.5 * h * b2, hp)
                a4, b4 = rhs(d + h * a3, tox + h * b3, hp)
                d = d + h / 6.0 * (a1 + 2.0 * a2 + 2.0 * a3 + a4)
                tox = tox + h / 6.0 * (b1 + 2.0 * b2 + 2.0 * b3 + b4)
        t = seg_end[s]
        seg_d.append(d)
        seg_t.append(tox)
    dead = [seg_d[i] for i in save_segment]
    toxic = [seg_t[i] for i in save_segment]
    if save_hours is None:
        return {"dead": dead[0], "toxic": toxic[0]}
    return {"dead": torch.stack(dead), "toxic": torch.stack(toxic)}

