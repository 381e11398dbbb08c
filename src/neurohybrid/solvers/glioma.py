"""Glioma growth: Fisher-Kolmogorov reaction-diffusion on a 3D voxel grid of tissue maps.

Model (Swanson-type)::

    du/dt = div(D(x) grad u) + rho u (1 - u),      D = dw * P_wm + dw * dg_ratio * P_gm

u is the tumour cell density normalised by the carrying capacity (0..1), time in days, lengths in
mm. Tissue is where D > 0; no tumour flux leaves tissue, and u outside tissue is held at 0 (an
initial condition there is discarded).

Discretisation (shared by the Numba solver and the torch twin):

* Cell-centred finite volumes, spacing (hx, hy, hz) may differ per axis. The face diffusivity
  between two voxels is the arithmetic mean of their D, and zero when either voxel is outside
  tissue, so every face flux leaves one voxel and enters the other: with rho = 0 total mass
  sum(u) * voxel volume is conserved to rounding.
* Time: Strang splitting. Diffusion is advanced by explicit (forward) Euler, the logistic
  reaction by its exact flow v -> v e^(rho t) / (1 + v (e^(rho t) - 1)) (no time error of its
  own). Half reaction steps at both ends of each interval, and inside it each diffusion step is
  fused with the full reaction step that follows it, so a step is still one memory sweep (the
  solver is memory-bandwidth bound). We preferred this to explicit Euler of the whole right-hand
  side because Euler's first-order error in the growth term slows Fisher fronts by several per
  cent at the step sizes the diffusion bound allows (rho dt ~ 0.02-0.05), whereas the exact
  reaction leaves only the diffusion/splitting error. With dt ~ h^2 (the stability bound) the
  scheme is second order in h overall; the measured orders are asserted in
  tests/solvers/test_glioma.py.
* Stable step (``stable_dt``)::

      dt = min( safety / (2 * max(D) * sum_i 1/h_i^2),  max_rho_dt / rho )

  With safety <= 1 the diffusion step is a convex combination of old values (the face mean
  never exceeds max(D)) and the exact logistic flow maps [0, 1] into itself monotonically, so u
  stays in [0, 1]. The rho cap only bounds the splitting error.
* Anisotropic variant (``tensor=``): a dimensionless shape tensor T(x) (for instance a DTI tensor
  scaled to unit mean diffusivity in white matter) times the scalar D(x) gives the diffusion
  tensor. Face flux = D_nn,f * du/dn + sum_t D_nt,f * du/dt,f, with the face tensor the arithmetic
  mean of the two voxels (zero if either is outside tissue), du/dn the two-point difference and
  the tangential derivative du/dt,f the mean of the two voxels' central differences (one-sided
  next to non-tissue). With T = I the cross terms vanish and it equals the scalar scheme. It is
  conservative (mass conserved to rounding) but, as every cross-term stencil, not monotone: small
  undershoots below 0 can appear next to sharp fronts in strongly anisotropic tissue. Its step
  bound is the Gershgorin bound of the discrete operator::

      dt = safety / max_x( 2 sum_i D_ii/h_i^2 + 4 sum_{i<j} |D_ij|/(h_i h_j) )

  (also capped by ``max_rho_dt / rho``), which reduces to the scalar bound for T = I.
* Radiotherapy (linear-quadratic): at each fraction time t_f, u <- u * exp(-(alpha d + beta d^2))
  inside the irradiated target (``Radiotherapy.target``, a mask on the maps' grid; None: everywhere).
  The integration lands exactly on fraction and save times (each interval between events is cut
  into equal steps no longer than dt); a state saved at a fraction time is the post-fraction one.

Performance (the Numba path): the grid is cropped to the tissue bounding box and padded by one
voxel, outside-tissue voxels carry a sentinel diffusivity that zeroes their faces without a branch
(see ``_glioma_kernels.OUTSIDE``), densities below 1e-15 are flushed to 0 (subnormal arithmetic,
see ``_glioma_kernels.TINY``), reaction and diffusion are fused into one pass, two buffers are
swapped instead of allocating, and the outer axis runs in parallel (prange). Voxel-updates in
the benchmark are counted over the cropped box (and, separately, over tissue voxels only).

Torch twin: ``glioma_coefficients_torch`` + ``glioma_step_torch`` (one fused split step, batched,
for solver-in-the-loop models) and ``simulate_glioma_torch`` (scalar and tensor variants) use the
same faces, schedule and Strang steps, on whatever device the tensors live, in float32/float64.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from neurohybrid.errors import InputError
from neurohybrid.solvers import _glioma_kernels as _k

__all__ = [
    "Radiotherapy",
    "gaussian_seed",
    "diffusivity_field",
    "stable_dt",
    "stable_dt_tensor",
    "simulate_glioma",
    "observe",
    "tensor_components",
    "glioma_coefficients_torch",
    "glioma_step_torch",
    "simulate_glioma_torch",
    "GliomaStepper",
    "strang_advance_torch",
]


# ----------------------------------------------------------------------------------------------
# Parameters and small helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Radiotherapy:
    """Fractionated radiotherapy with linear-quadratic cell kill.

    fraction_days: times (days, same clock as the simulation) of the fractions; dose_gy: dose per
    fraction; alpha (1/Gy), beta (1/Gy^2): LQ parameters (defaults alpha/beta = 10 Gy, a common
    glioma value). Each fraction multiplies u by ``survival = exp(-(alpha d + beta d^2))`` inside
    ``target`` (a boolean mask on the solver's grid: the irradiated volume; None irradiates every
    voxel). Compared by identity (eq=False): the target is an array.
    """

    fraction_days: Sequence[float]
    dose_gy: float
    alpha: float = 0.035
    beta: float = 0.0035
    target: np.ndarray | None = None
    days: tuple = field(init=False, repr=False)

    def __post_init__(self):
        try:
            days = tuple(float(t) for t in self.fraction_days)
        except (TypeError, ValueError):
            raise InputError(f"radiotherapy fraction_days must be numbers, "
                             f"got {self.fraction_days!r}") from None
        if not all(math.isfinite(t) and t >= 0 for t in days):
            raise InputError(f"radiotherapy fraction_days must be finite and >= 0, got {days}")
        for name in ("dose_gy", "alpha", "beta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"radiotherapy {name} must be a finite number >= 0, got {v!r}")
        object.__setattr__(self, "days", tuple(sorted(days)))
        if self.target is not None:
            t = np.asarray(self.target)
            if t.ndim != 3 or not (t.dtype == bool or np.isin(t, (0, 1)).all()):
                raise InputError(f"radiotherapy target must be a 3D 0/1 mask, got shape {t.shape}, dtype {t.dtype}")
            object.__setattr__(self, "target", t.astype(bool))

    def check_grid(self, shape) -> None:
        if self.target is not None and tuple(self.target.shape) != tuple(shape):
            raise InputError(f"radiotherapy target has shape {tuple(self.target.shape)}, the maps {tuple(shape)}")

    def window(self, start: float, stop: float, box=None) -> "Radiotherapy":
        """The fractions in (start, stop], on a clock starting at ``start``, with the target cut to
        ``box`` (slices): for a run of the solver over that interval on that box. Half-open (a
        fraction at a run's end is applied before its last state, as in one run), so consecutive
        windows apply every fraction exactly once."""
        days = [t - start for t in self.days if start < t <= stop]
        target = self.target if self.target is None or box is None else self.target[box]
        return Radiotherapy(days, self.dose_gy, self.alpha, self.beta, target)

    @property
    def survival(self) -> float:
        """Surviving fraction per fraction, exp(-(alpha d + beta d^2))."""
        d = float(self.dose_gy)
        return math.exp(-(self.alpha * d + self.beta * d * d))


def gaussian_seed(shape, spacing, center_vox, sigma_mm=2.0, amplitude=1.0) -> np.ndarray:
    """amplitude * exp(-|x - c|^2 / (2 sigma^2)), distances in mm (float64)."""
    shape = tuple(int(s) for s in shape)
    spacing = _check_spacing(spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"gaussian_seed needs a 3D shape, got {shape}")
    if len(center_vox) != 3:
        raise InputError(f"gaussian_seed needs a 3D center (voxel indices), got {center_vox}")
    if not (sigma_mm > 0 and 0 <= amplitude <= 1):
        raise InputError(f"gaussian_seed needs sigma_mm > 0 and 0 <= amplitude <= 1, "
                         f"got sigma_mm={sigma_mm}, amplitude={amplitude}")
    axes = [(np.arange(n) - c) * h for n, c, h in zip(shape, center_vox, spacing)]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    return amplitude * np.exp(-r2 / (2.0 * sigma_mm**2))


def diffusivity_field(wm, gm, dw, dg_ratio=0.1) -> np.ndarray:
    """D = dw * wm + dw * dg_ratio * gm (mm^2/day), in the dtype of wm."""
    wm = np.asarray(wm)
    gm = np.asarray(gm)
    dtype = wm.dtype if wm.dtype in (np.float32, np.float64) else np.float64
    d = dw * wm.astype(dtype, copy=False) + (dw * dg_ratio) * gm.astype(dtype, copy=False)
    return d.astype(dtype, copy=False)


def stable_dt(dmax, spacing, rho, *, safety=0.9, max_rho_dt=0.05) -> float:
    """Largest step: min(safety / (2 dmax sum 1/h^2), max_rho_dt / rho) (see module docstring)."""
    spacing = _check_spacing(spacing)
    if not (dmax >= 0 and rho >= 0 and 0 < safety <= 1 and max_rho_dt > 0):
        raise InputError(f"stable_dt needs dmax >= 0, rho >= 0, 0 < safety <= 1, max_rho_dt > 0; "
                         f"got dmax={dmax}, rho={rho}, safety={safety}, max_rho_dt={max_rho_dt}")
    rate = 2.0 * float(dmax) * sum(1.0 / h**2 for h in spacing)
    dt = math.inf if rate == 0 else safety / rate
    if rho > 0:
        dt = min(dt, max_rho_dt / rho)
    return dt


def stable_dt_tensor(tensor6, spacing, rho, *, safety=0.9, max_rho_dt=0.05) -> float:
    """Gershgorin step bound of the tensor scheme (see module docstring); tensor6 (..., 6)."""
    hx, hy, hz = _check_spacing(spacing)
    t = np.asarray(tensor6, dtype=np.float64)
    rate = (2.0 * (t[..., 0] / hx**2 + t[..., 1] / hy**2 + t[..., 2] / hz**2)
            + 4.0 * (np.abs(t[..., 3]) / (hx * hy) + np.abs(t[..., 4]) / (hx * hz)
                     + np.abs(t[..., 5]) / (hy * hz)))
    r = float(rate.max()) if rate.size else 0.0
    dt = math.inf if r == 0 else safety / r
    if rho > 0:
        dt = min(dt, max_rho_dt / rho)
    return dt


def observe(u, theta_t1gd=0.7, theta_flair=0.25):
    """Imaging observation model: (T1Gd mask, FLAIR mask) = (u >= theta_t1gd, u >= theta_flair)."""
    if not (0 < theta_flair <= 1 and 0 < theta_t1gd <= 1):
        raise InputError(f"observation thresholds must lie in (0, 1], got T1Gd={theta_t1gd}, "
                         f"FLAIR={theta_flair}")
    if theta_flair > theta_t1gd:
        raise InputError(f"FLAIR threshold ({theta_flair}) must not exceed the T1Gd threshold "
                         f"({theta_t1gd}): the enhancing core lies inside the FLAIR region")
    try:
        import torch

        if isinstance(u, torch.Tensor):
            return u >= theta_t1gd, u >= theta_flair
    except ImportError:  # torch is a hard dependency; this only keeps observe usable without it
        pass
    u = np.asarray(u)
    return u >= theta_t1gd, u >= theta_flair


def tensor_components(tensor) -> np.ndarray:
    """A (X,Y,Z,6) array (xx, yy, zz, xy, xz, yz) from a (X,Y,Z,6) or (X,Y,Z,3,3) tensor field."""
    t = np.asarray(tensor)
    if t.ndim == 5 and t.shape[-2:] == (3, 3):
        if not np.allclose(t, np.swapaxes(t, -1, -2), rtol=1e-6, atol=1e-12):
            raise InputError("diffusion tensor field (X,Y,Z,3,3) is not symmetric")
        return np.stack([t[..., 0, 0], t[..., 1, 1], t[..., 2, 2], t[..., 0, 1], t[..., 0, 2],
                         t[..., 1, 2]], axis=-1)
    if t.ndim == 4 and t.shape[-1] == 6:
        return t
    raise InputError(f"diffusion tensor field must have shape (X,Y,Z,6) or (X,Y,Z,3,3), "
                     f"got {t.shape}")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_spacing(spacing):
    try:
        sp = tuple(float(h) for h in spacing)
    except TypeError:
        raise InputError(f"spacing must be three voxel sizes in mm, got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(h) and h > 0 for h in sp):
        raise InputError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}")
    return sp


def _check_scalar(name, value, *, positive=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        bound = "> 0" if positive else ">= 0"
        raise InputError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def _check_maps(wm, gm, u0):
    wm, gm, u0 = np.asarray(wm), np.asarray(gm), np.asarray(u0)
    for name, a in (("wm", wm), ("gm", gm), ("u0", u0)):
        if a.ndim != 3:
            raise InputError(f"{name} must be a 3D volume, got shape {a.shape}")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise InputError(f"{name} must be numeric, got dtype {a.dtype}")
    if not (wm.shape == gm.shape == u0.shape):
        raise InputError(f"shape mismatch: wm {wm.shape}, gm {gm.shape}, u0 {u0.shape}")
    for name, a, hi in (("wm", wm, 1.0), ("gm", gm, 1.0), ("u0", u0, 1.0)):
        if a.dtype == bool:
            continue
        lo_v, hi_v = float(a.min()), float(a.max())  # NaN propagates through min/max
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
            raise InputError(f"{name} contains NaN or infinite values")
        if lo_v < 0:
            raise InputError(f"{name} has negative values (min {lo_v:g}); probabilities and "
                             f"densities must lie in [0, 1]")
        if hi_v > hi + 1e-6:
            raise InputError(f"{name} has values above 1 (max {hi_v:g}); probabilities and "
                             f"densities must lie in [0, 1] (a 0-255 map needs rescaling)")
    return wm, gm, u0


def _schedule(days, dt, save_days, fraction_days):
    """Segments of the run: list of (n_steps, step, event) with event 'save'/'fraction'/None.

    Events at the same time: fractions are applied before the save. Each segment between
    consecutive event times is cut into equal steps no longer than dt.
    """
    times = {float(days)}
    times.update(float(t) for t in save_days)
    times.update(float(t) for t in fraction_days if t <= days)
    plan = []
    t_prev = 0.0
    for t in sorted(times):
        if t > t_prev:
            n = max(1, math.ceil((t - t_prev) / dt - 1e-9))
            plan.append(("steps", n, (t - t_prev) / n))
        nfrac = sum(1 for f in fraction_days if f == t)
        if nfrac:
            plan.append(("fraction", nfrac, None))
        nsave = sum(1 for s in save_days if s == t)
        if nsave:
            plan.append(("save", nsave, None))
        t_prev = t
    return plan


def _check_save_days(save_days, days):
    if save_days is None:
        return None
    try:
        sd = [float(t) for t in save_days]
    except TypeError:
        raise InputError(f"save_days must be a sequence of days, got {save_days!r}") from None
    if any(not math.isfinite(t) or t < 0 or t > days + 1e-12 for t in sd):
        raise InputError(f"save_days must lie in [0, days={days}], got {sd}")
    if sd != sorted(sd):
        raise InputError(f"save_days must be sorted, got {sd}")
    return sd


@contextlib.contextmanager
def _numba_threads(threads):
    if threads is None:
        yield
        return
    import numba

    n = int(threads)
    if n < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _bbox(mask):
    idx = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], \
        np.nonzero(mask.any(axis=(0, 1)))[0]
    return tuple(slice(int(a[0]), int(a[-1]) + 1) for a in idx)


def _pad1(a, value=0):
    # C order matters: NIfTI data arrive Fortran-ordered, np.pad keeps that order, and the
    # kernels' innermost loop runs over the last axis; an F-ordered array made every step ~5x
    # slower (measured 9.9 vs 1.9 ms per step at 1 mm).
    padded = np.pad(a, [(1, 1)] * 3 + [(0, 0)] * (a.ndim - 3), constant_values=value)
    return np.ascontiguousarray(padded)


# ----------------------------------------------------------------------------------------------
# Numba solver
# ----------------------------------------------------------------------------------------------


def simulate_glioma(wm, gm, u0, *, spacing=(1, 1, 1), dw=0.2, rho=0.03, days=365.0,
                    dg_ratio=0.1, tensor=None, radiotherapy=None, dt=None, save_days=None,
                    threads=None, safety=0.9, max_rho_dt=0.05, return_info=False):
    """Integrate the Fisher-Kolmogorov model from u0 for `days` days.

    wm, gm: white/grey matter probabilities in [0, 1]; u0: initial density in [0, 1] (or a
    boolean mask, read as density 1). Returns the final u (dtype float32 when u0 is float32, else
    float64), or the list of states at `save_days` when given. dt=None picks ``stable_dt`` (or
    ``stable_dt_tensor``); a user dt larger than that bound is refused. threads sets Numba's thread
    count for this call (None: Numba's current setting, or 1 thread for grids under 64k voxels,
    where the per-step parallel launch costs more than it saves). return_info=True also returns
    a dict (dt, steps, cropped_shape, tissue_voxels).
    """
    wm, gm, u0 = _check_maps(wm, gm, u0)
    spacing = _check_spacing(spacing)
    dw = _check_scalar("dw", dw, positive=True)
    rho = _check_scalar("rho", rho)
    days = _check_scalar("days", days)
    dg_ratio = _check_scalar("dg_ratio", dg_ratio)
    save = _check_save_days(save_days, days)
    if radiotherapy is not None and not isinstance(radiotherapy, Radiotherapy):
        raise InputError(f"radiotherapy must be a Radiotherapy, got {type(radiotherapy).__name__}")
    if radiotherapy is not None:
        radiotherapy.check_grid(wm.shape)
    dtype = np.float32 if u0.dtype == np.float32 else np.float64

    # Crop first and do every full-size pass only once: at 1 mm the setup otherwise cost as much
    # as the whole time loop.
    tissue = wm > 0
    if dg_ratio > 0:
        tissue |= gm > 0
    if not tissue.any():
        raise InputError("empty brain: no voxel has white or grey matter (D > 0 nowhere)")
    box = _bbox(tissue)
    t_box = np.ascontiguousarray(tissue[box])
    d_box = diffusivity_field(np.ascontiguousarray(wm[box], dtype=dtype),
                              np.ascontiguousarray(gm[box], dtype=dtype), dw, dg_ratio)
    padded_shape = tuple(n + 2 for n in t_box.shape)
    inner = (slice(1, -1),) * 3
    a = np.zeros(padded_shape, dtype=dtype)  # C order: the kernels' inner loop is the last axis
    a[inner] = u0[box]
    a[inner][~t_box | (a[inner] < _k.TINY[np.dtype(dtype).name])] = 0  # see _k.TINY

    tens6 = None
    if tensor is not None:
        tens6 = tensor_components(tensor)
        if tens6.shape[:3] != wm.shape:
            raise InputError(f"shape mismatch: tensor {tens6.shape[:3]} vs maps {wm.shape}")
        if not np.isfinite(tens6).all():
            raise InputError("diffusion tensor field contains NaN or infinite values")
        tens6 = (tens6[box] * d_box[..., None]).astype(dtype)
        tens6[~t_box] = 0
        if (tens6[..., :3] < 0).any():
            raise InputError("diffusion tensor field has negative diagonal entries in tissue")
        bound = stable_dt_tensor(tens6, spacing, rho, safety=safety, max_rho_dt=max_rho_dt)
    else:
        bound = stable_dt(float(d_box.max()), spacing, rho, safety=safety, max_rho_dt=max_rho_dt)
    if dt is None:
        dt = bound
    else:
        dt = _check_scalar("dt", dt, positive=True)
        if dt > bound * (1 + 1e-12):
            raise InputError(f"dt={dt} exceeds the stability/accuracy bound {bound:.6g} days")

    fr_days = radiotherapy.days if radiotherapy is not None else ()
    plan = _schedule(days, dt, save or [], fr_days)
    rt_box = radiotherapy.target[box] if radiotherapy is not None and radiotherapy.target is not None else None

    one, zero, half, tiny = dtype(1), dtype(0), dtype(0.5), dtype(_k.TINY[np.dtype(dtype).name])
    hx, hy, hz = (dtype(h) for h in spacing)
    b = np.zeros_like(a)
    if tens6 is None:
        dm = np.full(padded_shape, _k.OUTSIDE, dtype=dtype)
        dm[inner] = d_box
        dm[inner][~t_box] = _k.OUTSIDE
        wx, wy, wz = (dtype(0.5 / h**2) for h in spacing)

        def step(src, dst, h, e_r):
            _k.fk_step_iso(src, dst, dm, wx, wy, wz, dtype(h), dtype(e_r), dtype(e_r - 1.0),
                           zero, one, tiny)
    else:
        tp = _pad1(t_box, False)
        tens_p = _pad1(tens6, 0)
        grad = np.zeros((3,) + a.shape, dtype=dtype)

        def step(src, dst, h, e_r):
            _k.masked_gradients(src, tp, grad, hx, hy, hz, zero, half)
            _k.fk_step_tensor(src, dst, tens_p, tp, grad, hx, hy, hz, dtype(h), dtype(e_r),
                              dtype(e_r - 1.0), zero, one, half, tiny)

    if threads is None and a.size < 65536:
        threads = 1  # a parallel launch per step costs more than it saves on tiny grids
    out, n_steps = [], 0
    with _numba_threads(threads):
        for kind, n, h in plan:
            if kind == "steps":
                # Strang: R(h/2) [D(h) R(h)] ... [D(h) R(h/2)], each bracket one fused sweep
                e_half, e_full = math.exp(rho * h / 2), math.exp(rho * h)
                if rho > 0:
                    _k.logistic_inplace(a, dtype(e_half), dtype(e_half - 1.0), one)
                for s in range(n):
                    step(a, b, h, e_full if s < n - 1 else e_half)
                    a, b = b, a
                n_steps += n
            elif kind == "fraction":
                if radiotherapy.target is None:
                    _k.scale_inplace(a, dtype(radiotherapy.survival ** n))
                else:
                    a[inner][rt_box] *= dtype(radiotherapy.survival ** n)
            else:
                full = np.zeros(wm.shape, dtype=dtype)
                full[box] = a[inner]
                out.extend([full] + [full.copy() for _ in range(n - 1)])
    if save is None:
        result = np.zeros(wm.shape, dtype=dtype)
        result[box] = a[inner]
    else:
        result = out
    if return_info:
        info = dict(dt=dt, steps=n_steps, cropped_shape=tuple(int(s.stop - s.start) for s in box),
                    tissue_voxels=int(t_box.sum()))
        return result, info
    return result


class GliomaStepper:
    """The Numba solver prepared once for many short advances of one state (isotropic, no
    radiotherapy): ``advance(days)`` is exactly one ``simulate_glioma(..., days=days)`` call from the
    current state (same ``stable_dt``, equal sub-steps, Strang half reaction steps at both ends),
    without the per-call validation, cropping and allocation. Solver-in-the-loop forecasts alternate
    it with a learned correction of ``state`` (a float32 view of the padded buffer, edited in place).
    """

    def __init__(self, wm, gm, u0, *, spacing, dw, rho, dg_ratio=0.1, safety=0.9, max_rho_dt=0.05, threads=1):
        wm, gm, u0 = _check_maps(wm, gm, u0)
        self.spacing = _check_spacing(spacing)
        self.dw = _check_scalar("dw", dw, positive=True)
        self.rho = _check_scalar("rho", rho)
        d = diffusivity_field(np.asarray(wm, np.float32), np.asarray(gm, np.float32), self.dw, float(dg_ratio))
        tissue = d > 0
        if not tissue.any():
            raise InputError("empty brain: no voxel has white or grey matter (D > 0 nowhere)")
        self.tissue = tissue
        self.dt = stable_dt(float(d.max()), self.spacing, self.rho, safety=safety, max_rho_dt=max_rho_dt)
        self.dm = _pad1(np.where(tissue, d, np.float32(_k.OUTSIDE)).astype(np.float32), _k.OUTSIDE)
        self._a = np.zeros(self.dm.shape, np.float32)
        self._b = np.zeros_like(self._a)
        self.threads = threads
        self.steps = 0
        self.load(u0)

    @property
    def state(self) -> np.ndarray:
        """The current u on the maps' grid (a view: edits change the state)."""
        return self._a[1:-1, 1:-1, 1:-1]

    def load(self, u) -> None:
        u = np.asarray(u, np.float32)
        inner = self.state
        inner[...] = np.where(self.tissue & (u >= _k.TINY["float32"]), u, np.float32(0))

    def advance(self, days: float) -> None:
        days = float(days)
        if days <= 0:
            return
        n = max(1, math.ceil(days / self.dt - 1e-9))
        h = days / n
        f = np.float32
        wx, wy, wz = (f(0.5 / s**2) for s in self.spacing)
        e_half, e_full = math.exp(self.rho * h / 2), math.exp(self.rho * h)
        one, zero, tiny = f(1), f(0), f(_k.TINY["float32"])
        with _numba_threads(self.threads):
            if self.rho > 0:
                _k.logistic_inplace(self._a, f(e_half), f(e_half - 1.0), one)
            for s in range(n):
                e = e_full if s < n - 1 else e_half
                _k.fk_step_iso(self._a, self._b, self.dm, wx, wy, wz, f(h), f(e), f(e - 1.0), zero, one, tiny)
                self._a, self._b = self._b, self._a
        self.steps += n


# ----------------------------------------------------------------------------------------------
# Torch twin (same discretisation: arithmetic face mean, explicit Euler, same schedule)
# ----------------------------------------------------------------------------------------------


def glioma_coefficients_torch(wm, gm, spacing, dw, dg_ratio=0.1):
    """Face conductances (cx, cy, cz) = D_face / h^2 between neighbours along x, y, z.

    Shapes (X-1,Y,Z), (X,Y-1,Z), (X,Y,Z-1). D_face is the arithmetic mean of the two voxels' D and
    0 if either is outside tissue (D == 0). Differentiable w.r.t. wm, gm and dw (tensor or float).
    """
    import torch

    hx, hy, hz = _check_spacing(spacing)
    d = dw * wm + (dw * dg_ratio) * gm
    tissue = (d > 0).detach()
    zero = torch.zeros((), dtype=d.dtype, device=d.device)

    def face(dim, h):
        n = d.shape[dim]
        a, b = d.narrow(dim, 0, n - 1), d.narrow(dim, 1, n - 1)
        both = tissue.narrow(dim, 0, n - 1) & tissue.narrow(dim, 1, n - 1)
        return torch.where(both, 0.5 * (a + b), zero) / (h * h)

    return face(-3, hx), face(-2, hy), face(-1, hz)


def _logistic_torch(u, rho, t):
    """Exact logistic flow over time t: u e / (1 + u (e - 1)), e = exp(rho t)."""
    import torch

    e = torch.exp(rho * t) if isinstance(rho, torch.Tensor) else math.exp(rho * t)
    return u * e / (1 + u * (e - 1))


def _diffusion_torch(u, coeffs, dt):
    import torch.nn.functional as F

    cx, cy, cz = coeffs
    fx = cx * (u[..., 1:, :, :] - u[..., :-1, :, :])
    fy = cy * (u[..., :, 1:, :] - u[..., :, :-1, :])
    fz = cz * (u[..., :, :, 1:] - u[..., :, :, :-1])
    div = (F.pad(fx, (0, 0, 0, 0, 0, 1)) - F.pad(fx, (0, 0, 0, 0, 1, 0))
           + F.pad(fy, (0, 0, 0, 1)) - F.pad(fy, (0, 0, 1, 0))
           + F.pad(fz, (0, 1)) - F.pad(fz, (1, 0)))
    return u + dt * div


def glioma_step_torch(u, coeffs, dt, rho, reaction_dt=None):
    """One fused split step: explicit Euler diffusion over dt, then the exact logistic flow over
    reaction_dt (default dt). Differentiable w.r.t. u, coeffs and rho (float or tensor).

    u: (..., X, Y, Z) (leading batch dims allowed); coeffs from ``glioma_coefficients_torch``.
    Outside tissue all faces are zero, so u there only feels the reaction: keep it 0.
    Repeating this step is Lie splitting (first-order splitting error); ``simulate_glioma_torch``
    adds the half reaction steps that make it Strang.
    """
    t_r = dt if reaction_dt is None else reaction_dt
    return _logistic_torch(_diffusion_torch(u, coeffs, dt), rho, t_r)


def strang_advance_torch(u, coeffs, days, rho, dt):
    """Advance u by ``days`` as ``simulate_glioma`` does over one interval: n = ceil(days / dt)
    equal steps h, Strang (half reaction step, n fused diffusion + reaction steps, the last with a
    half reaction step). Batched per member: days, rho and dt may be tensors broadcasting with u
    (e.g. (M, 1, 1, 1)); members with fewer steps stand still (zero steps) while others finish.
    Differentiable w.r.t. u, coeffs and rho."""
    import torch

    def t(x):
        return torch.as_tensor(x, dtype=u.dtype, device=u.device)

    days, dt, rho = t(days), t(dt), t(rho)
    n = torch.clamp(torch.ceil(days / dt - 1e-9), min=1.0)
    h = days / n
    u = _logistic_torch(u, rho, h / 2)
    for s in range(int(n.max())):
        live = (s < n).to(u.dtype)
        t_r = torch.where(s < n - 1, h, torch.where(s == n - 1, h / 2, torch.zeros_like(h)))
        u = _logistic_torch(_diffusion_torch(u, coeffs, h * live), rho, t_r)
    return u


def _lo(x, dim):
    """x without its last slice along dim (the lower voxel of each face)."""
    return x.narrow(dim, 0, x.shape[dim] - 1)


def _hi(x, dim):
    """x without its first slice along dim (the upper voxel of each face)."""
    return x.narrow(dim, 1, x.shape[dim] - 1)


def _shift(x, dim, offset, fill):
    """out[i] = x[i + offset] along dim (offset +1 or -1), `fill` beyond the edge."""
    import torch

    shape = list(x.shape)
    shape[dim] = 1
    edge = torch.full(shape, fill, dtype=x.dtype, device=x.device)
    return torch.cat([_hi(x, dim), edge] if offset > 0 else [edge, _lo(x, dim)], dim=dim)


def _tensor_diffusion_torch(u, tens6, tissue, spacing, dt):
    """Explicit Euler step of div(D grad u) with the tensor scheme of ``fk_step_tensor``."""
    import torch
    import torch.nn.functional as F

    dims = (-3, -2, -1)
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    grads = []
    for dim, h in zip(dims, spacing):  # masked central differences (one-sided near non-tissue)
        up, um = _shift(u, dim, 1, 0.0), _shift(u, dim, -1, 0.0)
        tp, tm = _shift(tissue, dim, 1, False), _shift(tissue, dim, -1, False)
        gr = torch.where(tp & tm, 0.5 * (up - um) / h,
                         torch.where(tp, (up - u) / h, torch.where(tm, (u - um) / h, zero)))
        grads.append(torch.where(tissue, gr, zero))
    # per face normal: (its D component, (cross component, tangential axis) x 2); components are
    # ordered xx, yy, zz, xy, xz, yz
    layout = ((0, (3, 1), (4, 2)), (1, (3, 0), (5, 2)), (2, (4, 0), (5, 1)))
    div = 0
    for dim, h, (cn, (c1, a1), (c2, a2)) in zip(dims, spacing, layout):
        tdim = dim - 1  # the tensor has a trailing component axis
        ta, tb = _lo(tens6, tdim), _hi(tens6, tdim)
        g1 = 0.5 * (_lo(grads[a1], dim) + _hi(grads[a1], dim))
        g2 = 0.5 * (_lo(grads[a2], dim) + _hi(grads[a2], dim))
        flux = (0.5 * (ta[..., cn] + tb[..., cn]) * ((_hi(u, dim) - _lo(u, dim)) / h)
                + 0.5 * (ta[..., c1] + tb[..., c1]) * g1
                + 0.5 * (ta[..., c2] + tb[..., c2]) * g2)
        flux = torch.where(_lo(tissue, dim) & _hi(tissue, dim), flux, zero)
        pad_hi = [0, 0] * (-dim - 1) + [0, 1]
        pad_lo = [0, 0] * (-dim - 1) + [1, 0]
        div = div + (F.pad(flux, pad_hi) - F.pad(flux, pad_lo)) / h
    return torch.where(tissue, u + dt * div, u)


def simulate_glioma_torch(wm, gm, u0, *, spacing, dw, rho, days, dg_ratio=0.1, dt=None,
                          save_days=None, radiotherapy=None, tensor=None, safety=0.9,
                          max_rho_dt=0.05):
    """Torch twin of ``simulate_glioma``, differentiable w.r.t. u0, dw, rho, the tissue maps and
    the tensor field; runs on the device and in the dtype of u0 (float32 or float64).

    dw and rho may be floats or 0-d tensors. Returns the final u, or a (T, X, Y, Z) stack at
    save_days. The step count and dt come from the same ``stable_dt`` / schedule as the Numba
    solver (computed from detached values), so both solvers take identical steps.
    """
    import torch
    import torch.nn.functional as F

    if not all(isinstance(t, torch.Tensor) for t in (wm, gm, u0)):
        raise InputError("simulate_glioma_torch needs torch tensors for wm, gm and u0")
    if u0.dtype not in (torch.float32, torch.float64):
        raise InputError(f"u0 must be float32 or float64, got {u0.dtype}")
    if u0.ndim != 3 or wm.shape != u0.shape or gm.shape != u0.shape:
        raise InputError(f"shape mismatch: wm {tuple(wm.shape)}, gm {tuple(gm.shape)}, "
                         f"u0 {tuple(u0.shape)} (all must be the same 3D shape)")
    for name, a in (("wm", wm), ("gm", gm), ("u0", u0)):
        a = a.detach()
        if not torch.isfinite(a).all():
            raise InputError(f"{name} contains NaN or infinite values")
        if (a < 0).any() or (a > 1 + 1e-6).any():
            raise InputError(f"{name} must lie in [0, 1]")
    def _value(x):
        return float(x.detach()) if isinstance(x, torch.Tensor) else x

    dw_v = _check_scalar("dw", _value(dw), positive=True)
    rho_v = _check_scalar("rho", _value(rho))
    days = _check_scalar("days", days)
    spacing = _check_spacing(spacing)
    save = _check_save_days(save_days, days)
    wm, gm = wm.to(u0.dtype), gm.to(u0.dtype)

    d_det = (dw_v * wm + dw_v * float(dg_ratio) * gm).detach()
    tissue = d_det > 0
    if not bool(tissue.any()):
        raise InputError("empty brain: no voxel has white or grey matter (D > 0 nowhere)")
    box = _bbox(tissue.cpu().numpy())
    t_box = tissue[box]
    if tensor is not None:
        if not isinstance(tensor, torch.Tensor):
            raise InputError("simulate_glioma_torch needs a torch tensor field")
        if tensor.ndim == 5 and tuple(tensor.shape[-2:]) == (3, 3):
            tensor = torch.stack([tensor[..., 0, 0], tensor[..., 1, 1], tensor[..., 2, 2],
                                  tensor[..., 0, 1], tensor[..., 0, 2], tensor[..., 1, 2]], -1)
        if tensor.ndim != 4 or tensor.shape[-1] != 6 or tuple(tensor.shape[:3]) != tuple(u0.shape):
            raise InputError(f"tensor field must be (X,Y,Z,6) or (X,Y,Z,3,3) on the maps' grid, "
                             f"got {tuple(tensor.shape)}")
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise InputError("diffusion tensor field contains NaN or infinite values")
        d_box = dw * wm[box] + (dw * dg_ratio) * gm[box]
        tens6 = torch.where(t_box[..., None], tensor[box].to(u0.dtype) * d_box[..., None],
                            torch.zeros((), dtype=u0.dtype, device=u0.device))
        bound = stable_dt_tensor(tens6.detach().cpu().numpy(), spacing, rho_v, safety=safety,
                                 max_rho_dt=max_rho_dt)
    else:
        bound = stable_dt(float(d_det.max()), spacing, rho_v, safety=safety, max_rho_dt=max_rho_dt)
        coeffs = glioma_coefficients_torch(wm[box], gm[box], spacing, dw, dg_ratio)
    if dt is None:
        dt = bound
    else:
        dt = _check_scalar("dt", dt, positive=True)
        if dt > bound * (1 + 1e-12):
            raise InputError(f"dt={dt} exceeds the stability/accuracy bound {bound:.6g} days")
    u = torch.where(t_box, u0[box], torch.zeros((), dtype=u0.dtype, device=u0.device))
    pads = []
    for s, n in zip(reversed(box), reversed(u0.shape)):
        pads += [s.start, n - s.stop]

    fr_days = radiotherapy.days if radiotherapy is not None else ()
    if radiotherapy is not None:
        radiotherapy.check_grid(tuple(u0.shape))
    out = []
    for kind, n, h in _schedule(days, dt, save or [], fr_days):
        if kind == "steps":  # Strang, as in simulate_glioma
            u = _logistic_torch(u, rho, h / 2)  # also at rho = 0: keeps d/d rho exact
            for s in range(n):
                t_r = h if s < n - 1 else h / 2
                if tensor is None:
                    u = glioma_step_torch(u, coeffs, h, rho, t_r)
                else:
                    u = _tensor_diffusion_torch(u, tens6, t_box, spacing, h)
                    u = _logistic_torch(u, rho, t_r)
        elif kind == "fraction":
            kill = radiotherapy.survival ** n
            if radiotherapy.target is None:
                u = u * kill
            else:
                u = torch.where(torch.as_tensor(radiotherapy.target[box], device=u.device), u * kill, u)
        else:
            out.extend([F.pad(u, pads)] * n)
    if save is None:
        return F.pad(u, pads)
    return torch.stack(out)
