"""Network models of tau spread on a structural connectome (Alzheimer's disease).

Models (state u: one value per region, time in years):

* ``"diffusion"``   du/dt = -kappa L u                               (network diffusion, Raj et al. 2012)
* ``"fkpp"``        du/dt = -kappa L u + alpha u (1 - u)             (global network Fisher-KPP)
* ``"local"``       du/dt = -kappa L (u - b) + alpha (u - b)(c - u)  (local FKPP)

The local form is our reading of Chaggar et al. 2025 (PLOS Biol) "local FKPP" (check against the
paper before relying on it): b is a regional baseline (healthy SUVR), c a regional carrying
capacity (maximal SUVR); transport acts on the excess u - b and the logistic production drives
each region from b towards its own c. u = b is a fixed point; u = c
is one as well whenever c - b is uniform across regions (then L (c - b) = 0).

Numerics. ``simulate_network`` integrates a batch of B parameter sets at once with the
Dormand-Prince 5(4) pair (the tableau and error control of scipy's RK45), or with classical RK4
on a fixed step. The batch is cut into chunks run on a thread pool (the kernels release the
GIL); inside a chunk all members share the step size (the error norm is the worst member's),
which lets the transport term of the whole chunk be one matrix-matrix product (BLAS gemm)
instead of B matrix-vector products. Each member still meets the requested tolerance. Outputs
between steps come from the quartic dense output of the pair (as scipy's RK45), so output times
do not shorten steps; members are sorted by a stiffness estimate before chunking so that a
chunk's shared step suits all its members.

``simulate_network_torch`` is the differentiable twin: the same RK4 step grid (equal to the
Numba RK4 to round-off in float64) or any torchdiffeq method.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from neurohybrid.errors import InputError

MODELS = {"diffusion": 0, "fkpp": 1, "local": 2}
METHODS = ("dopri5", "rk4")

# ---------------------------------------------------------------------------------------------
# Laplacian


def laplacian(weights, volumes=None, normalise="max", volume_scaling="left") -> np.ndarray:
    """Graph Laplacian L = diag(sum_j W_ij) - W of a weighted, symmetric connectome.

    normalise: "max" divides W by its largest weight (so kappa ranges are comparable across
        connectomes, as in Chaggar et al. 2025); None or "none" keeps the weights.
    volumes: optional regional volumes (any unit; divided by their mean so kappa keeps its
        meaning). With volume_scaling="left", L_v = V^-1 L: u is a concentration and the total
        amount sum_i V_i u_i is conserved by pure diffusion. With "symmetric",
        L_v = V^-1/2 L V^-1/2 (symmetric, same spectrum as the left form).
    The diagonal of W (self-connections) does not move anything and is ignored.
    """
    w = np.array(weights, dtype=np.float64, copy=True)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise InputError(f"connectome must be a square matrix, got shape {w.shape}")
    if w.shape[0] < 2:
        raise InputError("connectome needs at least 2 regions")
    if not np.all(np.isfinite(w)):
        raise InputError("connectome has NaN or infinite weights")
    if np.any(w < 0):
        raise InputError("connectome has negative weights")
    scale = max(float(np.abs(w).max()), 1e-300)
    if not np.allclose(w, w.T, atol=1e-8 * scale, rtol=1e-6):
        raise InputError("connectome is not symmetric")
    w = 0.5 * (w + w.T)
    np.fill_diagonal(w, 0.0)
    if normalise == "max":
        wmax = w.max()
        if wmax <= 0:
            raise InputError("connectome has no connections (all off-diagonal weights are zero)")
        w = w / wmax
    elif normalise not in (None, "none"):
        raise ValueError(f"normalise must be 'max' or None, got {normalise!r}")
    lap = np.diag(w.sum(axis=1)) - w
    if volumes is None:
        return lap
    v = np.asarray(volumes, dtype=np.float64).ravel()
    if v.shape != (w.shape[0],):
        raise InputError(f"{v.size} regional volumes for {w.shape[0]} regions")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise InputError("regional volumes must be finite and positive")
    v = v / v.mean()
    if volume_scaling == "left":
        return lap / v[:, None]
    if volume_scaling == "symmetric":
        s = 1.0 / np.sqrt(v)
        return s[:, None] * lap * s[None, :]
    raise ValueError(f"volume_scaling must be 'left' or 'symmetric', got {volume_scaling!r}")


# ---------------------------------------------------------------------------------------------
# Numba kernels (arrays and scalars only)

# Dormand-Prince 5(4) tableau (as in scipy.integrate.RK45)
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0])
_A = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [1 / 5, 0.0, 0.0, 0.0, 0.0],
        [3 / 40, 9 / 40, 0.0, 0.0, 0.0],
        [44 / 45, -56 / 15, 32 / 9, 0.0, 0.0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0.0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    ]
)
_B = np.array([35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84])
# difference between the 5th- and 4th-order solutions, last entry multiplies f(t+h, y_new) (FSAL)
_E = np.array([-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40])
# quartic dense output (Shampine 1986, as scipy's RK45): y(t + th h) = y + h sum_j K_j sum_k P[j,k] th^(k+1)
_P = np.array(
    [
        [1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799],
        [0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072],
        [0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632],
        [0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844],
        [0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423],
    ]
)


@njit(cache=True, fastmath=False)
def _rhs(model, lap_t, y, kappa, alpha, base, cap, work, work2, out):
    """out = f(y) for every member (rows of y); the transport of all rows is one gemm."""
    m, n = y.shape
    if model == 2:
        for b in range(m):
            for i in range(n):
                work2[b, i] = y[b, i] - base[b, i]
        np.dot(work2, lap_t, work)  # row b = (L (y_b - base_b))^T
    else:
        np.dot(y, lap_t, work)
    for b in range(m):
        k = kappa[b]
        a = alpha[b]
        for i in range(n):
            v = -k * work[b, i]
            if model == 1:
                v += a * y[b, i] * (1.0 - y[b, i])
            elif model == 2:
                v += a * (y[b, i] - base[b, i]) * (cap[b, i] - y[b, i])
            out[b, i] = v


@njit(cache=True)
def _rms_scaled_max(e, y0, y1, rtol, atol):
    """max over members of the RMS of e / (atol + rtol * max(|y0|, |y1|))."""
    m, n = e.shape
    worst = 0.0
    for b in range(m):
        s = 0.0
        for i in range(n):
            sc = atol + rtol * max(abs(y0[b, i]), abs(y1[b, i]))
            r = e[b, i] / sc
            s += r * r
        s = math.sqrt(s / n)
        if s > worst:
            worst = s
    return worst


@njit(cache=True)
def _combine(y, h, c, ks, nk, out):
    """out = y + h * sum_j c[j] * ks[j] over flat arrays (a contiguous loop that LLVM vectorises)."""
    n = y.shape[0]
    for i in range(n):
        acc = 0.0
        for j in range(nk):
            acc += c[j] * ks[j, i]
        out[i] = y[i] + h * acc


@njit(cache=True, inline="always")
def _store(out, rows, k, y):
    """out[rows[b], k, :] = y[b]: chunks write straight into the caller's (B, T, N) result."""
    for b in range(y.shape[0]):
        out[rows[b], k, :] = y[b]


@njit(cache=True, nogil=True)
def _dopri5_chunk(model, lap_t, u0, kappa, alpha, base, cap, t0, t_eval, rtol, atol, hmax, rows, out):
    """Integrate one chunk (members share the step); out[rows[b], k, :] = u_b(t_eval[k]).

    hmax keeps steps inside the method's stability region: near a fixed point the error estimate
    sees only round-off and would otherwise grow the step until round-off is amplified.
    Returns the number of steps tried, or -1 on step-size underflow."""
    m, n = u0.shape
    size = m * n
    y = u0.copy()
    ynew = np.empty_like(y)
    ytmp = np.empty_like(y)
    err = np.empty_like(y)
    work = np.empty_like(y)
    work2 = np.empty_like(y)
    K = np.empty((7, m, n))
    Kf = K.reshape((7, size))  # flat views of the same memory
    yf = y.reshape(size)
    ynewf = ynew.reshape(size)
    ytmpf = ytmp.reshape(size)
    errf = err.reshape(size)
    zero = np.zeros(size)
    _rhs(model, lap_t, y, kappa, alpha, base, cap, work, work2, K[0])

    # initial step (Hairer, Norsett & Wanner II.4, as scipy's select_initial_step), smallest member's
    t_end = t_eval[-1]
    span = t_end - t0
    h = span if span > 0 else 1.0
    if span > 0:
        for b in range(m):
            d0 = 0.0
            d1 = 0.0
            for i in range(n):
                sc = atol + abs(y[b, i]) * rtol
                d0 += (y[b, i] / sc) ** 2
                d1 += (K[0, b, i] / sc) ** 2
            d0 = math.sqrt(d0 / n)
            d1 = math.sqrt(d1 / n)
            h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
            hb = min(h0, span)
            if hb < h:
                h = hb
        # second-derivative estimate on the whole chunk
        for i in range(size):
            ytmpf[i] = yf[i] + h * Kf[0, i]
        _rhs(model, lap_t, ytmp, kappa, alpha, base, cap, work, work2, K[1])
        d2 = 0.0
        d1max = 0.0
        for b in range(m):
            s2 = 0.0
            s1 = 0.0
            for i in range(n):
                sc = atol + abs(y[b, i]) * rtol
                s2 += ((K[1, b, i] - K[0, b, i]) / sc) ** 2
                s1 += (K[0, b, i] / sc) ** 2
            s2 = math.sqrt(s2 / n) / h
            s1 = math.sqrt(s1 / n)
            d2 = max(d2, s2)
            d1max = max(d1max, s1)
        if d1max <= 1e-15 and d2 <= 1e-15:
            h1 = max(1e-6, h * 1e-3)
        else:
            h1 = (0.01 / max(d1max, d2)) ** 0.2
        h = min(100 * h, h1, span, hmax)

    t = t0
    n_steps = 0
    k_out = 0
    n_out = t_eval.shape[0]
    dense_w = np.empty(7)
    dense_row = np.empty(size)
    while k_out < n_out and t_eval[k_out] <= t0:
        _store(out, rows, k_out, y)
        k_out += 1
    rejected = False
    while k_out < n_out:
        h_try = h
        last = False
        if t + h_try >= t_end - 1e-12 * max(1.0, abs(t_end)):
            h_try = t_end - t
            last = True
        for s in range(1, 6):
            _combine(yf, h_try, _A[s], Kf, s, ytmpf)
            _rhs(model, lap_t, ytmp, kappa, alpha, base, cap, work, work2, K[s])
        _combine(yf, h_try, _B, Kf, 6, ynewf)
        _rhs(model, lap_t, ynew, kappa, alpha, base, cap, work, work2, K[6])
        _combine(zero, h_try, _E, Kf, 7, errf)
        enorm = _rms_scaled_max(err, y, ynew, rtol, atol)
        n_steps += 1
        if enorm < 1.0:
            if enorm == 0.0:
                factor = 10.0
            else:
                factor = min(10.0, 0.9 * enorm ** -0.2)
            if rejected:
                factor = min(1.0, factor)
            t_new = t_end if last else t + h_try
            # outputs inside the step from the dense interpolant, so outputs never shorten steps
            while k_out < n_out and t_eval[k_out] <= t_new:
                if t_eval[k_out] == t_new:
                    _store(out, rows, k_out, ynew)
                else:
                    theta = (t_eval[k_out] - t) / h_try
                    for j in range(7):
                        dense_w[j] = theta * (_P[j, 0] + theta * (_P[j, 1] + theta * (_P[j, 2] + theta * _P[j, 3])))
                    _combine(yf, h_try, dense_w, Kf, 7, dense_row)
                    _store(out, rows, k_out, dense_row.reshape((m, n)))
                k_out += 1
            t = t_new
            yf[:] = ynewf
            Kf[0, :] = Kf[6]
            h = min(h_try * factor, hmax)
            rejected = False
        else:
            h = h_try * max(0.2, 0.9 * enorm ** -0.2)
            rejected = True
            if h < 1e-14 * max(1.0, abs(t)):
                return -1
    return n_steps


@njit(cache=True, nogil=True)
def _rk4_chunk(model, lap_t, u0, kappa, alpha, base, cap, t0, t_eval, substeps, rows, out):
    m, n = u0.shape
    y = u0.copy()
    ytmp = np.empty_like(y)
    work = np.empty_like(y)
    work2 = np.empty_like(y)
    k1 = np.empty_like(y)
    k2 = np.empty_like(y)
    k3 = np.empty_like(y)
    k4 = np.empty_like(y)
    t_prev = t0
    for k in range(t_eval.shape[0]):
        ns = substeps[k]
        if ns > 0:
            h = (t_eval[k] - t_prev) / ns
            for _ in range(ns):
                _rhs(model, lap_t, y, kappa, alpha, base, cap, work, work2, k1)
                for b in range(m):
                    for i in range(n):
                        ytmp[b, i] = y[b, i] + 0.5 * h * k1[b, i]
                _rhs(model, lap_t, ytmp, kappa, alpha, base, cap, work, work2, k2)
                for b in range(m):
                    for i in range(n):
                        ytmp[b, i] = y[b, i] + 0.5 * h * k2[b, i]
                _rhs(model, lap_t, ytmp, kappa, alpha, base, cap, work, work2, k3)
                for b in range(m):
                    for i in range(n):
                        ytmp[b, i] = y[b, i] + h * k3[b, i]
                _rhs(model, lap_t, ytmp, kappa, alpha, base, cap, work, work2, k4)
                for b in range(m):
                    for i in range(n):
                        y[b, i] += h / 6.0 * (k1[b, i] + 2.0 * k2[b, i] + 2.0 * k3[b, i] + k4[b, i])
        _store(out, rows, k, y)
        t_prev = t_eval[k]
    return 0


def _integrate_chunks(method, model, lap_t, u0, kappa, alpha, base, cap, t0, t_eval, substeps, rtol, atol,
                      chunk, threads, stiff, rows, out):
    """Integrate chunks of the batch on a thread pool; returns steps per chunk (-1: failed).

    The chunk kernels release the GIL (nogil), so Python threads run them in parallel. We use a
    thread pool instead of numba's prange because a parallel kernel around these solvers takes
    several times longer to compile, for no run-time gain at this granularity.
    """
    bsz = u0.shape[0]
    bounds = [(lo, min(bsz, lo + chunk)) for lo in range(0, bsz, chunk)]

    def work(bound):
        lo, hi = bound
        args = (model, lap_t, u0[lo:hi].copy(), kappa[lo:hi].copy(), alpha[lo:hi].copy(), base[lo:hi].copy(),
                cap[lo:hi].copy(), t0, t_eval)
        if method == "dopri5":
            # DOPRI5's stability region reaches ~3.3 on the negative real axis
            hmax = 3.0 / max(float(stiff[lo:hi].max()), 1e-300)
            steps = _dopri5_chunk(*args, rtol, atol, hmax, rows[lo:hi].copy(), out)
        else:
            steps = _rk4_chunk(*args, substeps, rows[lo:hi].copy(), out)
        return steps

    if threads <= 1 or len(bounds) == 1:
        return np.array([work(b) for b in bounds])
    with ThreadPoolExecutor(max_workers=min(threads, len(bounds))) as pool:
        return np.array(list(pool.map(work, bounds)))


# ---------------------------------------------------------------------------------------------
# Python wrapper


@contextlib.contextmanager
def _blas_single_thread():
    """BLAS threads inside our worker threads would oversubscribe the cores: pin BLAS to 1.

    A cached ThreadpoolController: building one scans the loaded libraries (~5 ms), as much as a
    whole batch of small solves."""
    controller = _threadpool_controller()
    if controller is None:  # threadpoolctl comes with scikit-learn/nilearn; without it, run as is
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@functools.lru_cache(maxsize=1)
def _threadpool_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    # Numba's np.dot calls scipy's BLAS: load it before the controller lists the libraries
    import scipy.linalg.cython_blas  # noqa: F401

    return ThreadpoolController()


def spectral_radius_bound(lap) -> float:
    """Gershgorin bound max_i sum_j |L_ij| (>= the spectral radius; O(N^2), no eigensolver)."""
    return float(np.abs(lap).sum(axis=1).max())


@contextlib.contextmanager
def _numba_threads(threads):
    if threads is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _prepare(L, u0, t_eval, kappa, alpha, model, baseline, capacity, t0):
    """Validate and broadcast everything to float64 arrays: (L, U0 (B,N), kappa (B,), ...)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    lap = np.asarray(L, dtype=np.float64)
    if lap.ndim != 2 or lap.shape[0] != lap.shape[1]:
        raise InputError(f"Laplacian must be square, got shape {lap.shape}")
    if not np.all(np.isfinite(lap)):
        raise InputError("Laplacian has NaN or infinite entries")
    n = lap.shape[0]
    u = np.asarray(u0, dtype=np.float64)
    scalar_batch = u.ndim == 1
    kap = np.atleast_1d(np.asarray(kappa, dtype=np.float64))
    alp = np.atleast_1d(np.asarray(0.0 if model == "diffusion" else alpha, dtype=np.float64))
    if u.ndim == 1:
        u = u[None, :]
    if u.ndim != 2 or u.shape[1] != n:
        raise InputError(f"u0 must have shape (N,) or (B, N) with N={n}, got {np.shape(u0)}")
    bsz = max(u.shape[0], kap.size, alp.size)
    for name, arr in (("u0", u), ("kappa", kap), ("alpha", alp)):
        if arr.shape[0] not in (1, bsz) or (arr.ndim == 1 and arr.size not in (1, bsz)):
            raise InputError(f"{name} has batch size {arr.shape[0]}, expected 1 or {bsz}")
    # broadcast views are read-only (and Numba compiles read-only arrays separately): copy
    u = np.broadcast_to(u, (bsz, n)).copy()
    kap = np.broadcast_to(kap.ravel(), (bsz,)).copy()
    alp = np.broadcast_to(alp.ravel(), (bsz,)).copy()

    def regional(name, value, default):
        arr = np.asarray(default if value is None else value, dtype=np.float64)
        if arr.ndim == 0:
            arr = np.full(n, float(arr))
        if arr.shape not in ((n,), (bsz, n)):
            raise InputError(f"{name} must have shape ({n},) or ({bsz}, {n}), got {arr.shape}")
        return np.broadcast_to(arr, (bsz, n)).copy()

    if model == "local" and (baseline is None or capacity is None):
        raise InputError("the local FKPP model needs regional baseline and capacity")
    base = regional("baseline", baseline, 0.0)
    cap = regional("capacity", capacity, 1.0)
    t = np.array(t_eval, dtype=np.float64, copy=True).ravel()
    if t.size == 0:
        raise InputError("t_eval is empty")
    for name, arr in (("u0", u), ("kappa", kap), ("alpha", alp), ("baseline", base), ("capacity", cap), ("t_eval", t)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} has NaN or infinite values")
    if np.any(np.diff(t) < 0):
        raise InputError("t_eval must be non-decreasing")
    if t[0] < t0:
        raise InputError(f"t_eval starts at {t[0]} before the initial time {t0}")
    return lap, u, kap, alp, base, cap, t, scalar_batch


def _stiffness(lap, kap, alp, base, cap):
    """Upper bound of the Jacobian's spectral radius, used to pick a safe fixed step."""
    rho = spectral_radius_bound(lap)
    react = float(np.abs(alp).max()) * max(1.0, float(np.abs(cap).max()) + float(np.abs(base).max()))
    return float(np.abs(kap).max()) * rho + react


def rk4_substeps(t_eval, t0, dt):
    """Number of equal RK4 steps in each output interval (shared by the Numba and torch versions)."""
    t = np.asarray(t_eval, dtype=np.float64).ravel()
    edges = np.concatenate([[t0], t])
    gaps = np.diff(edges)
    return np.where(gaps > 0, np.maximum(1, np.ceil(gaps / dt - 1e-9)), 0).astype(np.int64)


def default_rk4_dt(lap, kappa, alpha, baseline=None, capacity=None):
    """A step with h * (Jacobian bound) <= 0.05: RK4's local error ~ (0.05)^5/120 ~ 3e-9 relative."""
    kap = np.atleast_1d(np.asarray(kappa, dtype=np.float64))
    alp = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
    base = np.zeros(1) if baseline is None else np.asarray(baseline, dtype=np.float64)
    cap = np.ones(1) if capacity is None else np.asarray(capacity, dtype=np.float64)
    lam = _stiffness(np.asarray(lap, dtype=np.float64), kap, alp, base, cap)
    return min(0.25, 0.05 / max(lam, 1e-12))


def simulate_network(L, u0, t_eval, *, kappa, alpha=0.0, model="fkpp", baseline=None, capacity=None,
                     threads=None, method="dopri5", rtol=1e-8, atol=1e-10, dt=None, t0=0.0,
                     chunk=None, return_steps=False) -> np.ndarray:
    """Integrate a batch of network models; returns u at t_eval with shape (B, T, N) (float64).

    L: (N, N) Laplacian (``laplacian``). u0: (N,) or (B, N) state at t0 (years).
    kappa, alpha: scalars or (B,) arrays (per year). baseline, capacity: (N,) or (B, N), local model.
    method "dopri5" (adaptive, rtol/atol as scipy's) or "rk4" (fixed step dt, default from
    ``default_rk4_dt``). threads: worker threads for this call (default: all CPUs). chunk: members
    sharing one step size (default: the batch split evenly over the threads, at most 128).
    A (N,) u0 with scalar kappa and alpha still returns (1, T, N).
    """
    lap, u, kap, alp, base, cap, t, _ = _prepare(L, u0, t_eval, kappa, alpha, model, baseline, capacity, t0)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    bsz, n = u.shape
    if method == "rk4":
        if dt is None:
            dt = default_rk4_dt(lap, kap, alp, base if model == "local" else None, cap if model == "local" else None)
        substeps = rk4_substeps(t, t0, float(dt))
    else:
        substeps = np.zeros(t.size, dtype=np.int64)
    # group members of similar stiffness (Jacobian bound) so a chunk's shared step suits all of them
    rho = spectral_radius_bound(lap)
    stiff = kap * rho + np.abs(alp) * (1.0 + np.abs(cap).max(axis=1) + np.abs(base).max(axis=1))
    order = np.argsort(stiff, kind="stable")
    u, kap, alp, base, cap, stiff = (np.ascontiguousarray(a[order]) for a in (u, kap, alp, base, cap, stiff))
    out = np.empty((bsz, t.size, n))
    nthreads = max(1, int(threads)) if threads is not None else (os.cpu_count() or 1)
    if chunk is None:
        # small chunks keep the 7 stage arrays in cache and let members adapt their own steps;
        # enough chunks to feed every thread
        # (about 4 chunks per thread balance the load: stiff chunks take more steps)
        chunk = max(1, min(128, -(-bsz // (4 * nthreads)) if nthreads > 1 else 128))
        chunk = max(chunk, min(16, bsz))
    with _blas_single_thread():
        steps = _integrate_chunks(method, MODELS[model], np.ascontiguousarray(lap.T), u, kap, alp, base, cap,
                                  float(t0), t, substeps, float(rtol), float(atol), int(chunk), nthreads, stiff, order, out)
    if np.any(steps < 0):
        raise RuntimeError(f"network ODE step size underflow in {int(np.sum(steps < 0))} chunk(s); check the parameters")
    if return_steps:
        return out, steps
    return out


# ---------------------------------------------------------------------------------------------
# torch twin


def _torch_converter(ref, device, dtype):
    """(as_tensor, device, dtype) for a torch twin: device and dtype default to those of ``ref``
    (a tensor argument, or None), else CPU / float64; ``as_tensor`` moves any array there."""
    import torch

    from neurohybrid.hybrid.device import resolve_device

    ref = ref if torch.is_tensor(ref) else None
    dev = resolve_device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    dty = dtype or (ref.dtype if ref is not None else torch.float64)

    def as_tensor(x):
        if torch.is_tensor(x):
            return x.to(device=dev, dtype=dty)
        return torch.as_tensor(np.asarray(x, dtype=np.float64), device=dev, dtype=dty)

    return as_tensor, dev, dty


def network_rhs_torch(u, lap, kappa, alpha, model="fkpp", baseline=None, capacity=None):
    """f(u) for u of shape (B, N); kappa, alpha (B,); the same right-hand side as the Numba kernel."""
    if model == "local":
        excess = u - baseline
        return -kappa[:, None] * (excess @ lap.T) + alpha[:, None] * excess * (capacity - u)
    du = -kappa[:, None] * (u @ lap.T)
    if model == "fkpp":
        du = du + alpha[:, None] * u * (1.0 - u)
    return du


def simulate_network_torch(L, u0, t_eval, *, kappa, alpha=0.0, model="fkpp", baseline=None, capacity=None,
                           method="rk4", dt=None, t0=0.0, rtol=1e-7, atol=1e-9, device=None, dtype=None):
    """Torch twin of ``simulate_network``: returns a (B, T, N) tensor, differentiable w.r.t. every
    tensor input (kappa, alpha, u0, L, baseline, capacity).

    method "rk4" uses exactly the Numba RK4 step grid (``rk4_substeps``; dt defaults to
    ``default_rk4_dt``); any other name ("dopri5", "tsit5", ...) goes to ``torchdiffeq.odeint``.
    dtype/device default to those of u0 when it is a tensor, else float64 on CPU.
    """
    import torch

    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    as_t, dev, dty = _torch_converter(u0, device, dtype)

    lap = as_t(L)
    n = lap.shape[0]
    u = as_t(u0)
    if u.ndim == 1:
        u = u[None, :]
    kap = as_t(kappa).reshape(-1)
    alp = as_t(0.0 if model == "diffusion" else alpha).reshape(-1)
    bsz = max(u.shape[0], kap.numel(), alp.numel())
    u = u.expand(bsz, n)
    kap = kap.expand(bsz)
    alp = alp.expand(bsz)
    if model == "local":
        if baseline is None or capacity is None:
            raise InputError("the local FKPP model needs regional baseline and capacity")
        base = as_t(baseline).expand(bsz, n)
        cap = as_t(capacity).expand(bsz, n)
    else:
        base = cap = None
    t = np.asarray(t_eval, dtype=np.float64).ravel()
    if np.any(np.diff(t) < 0) or t[0] < t0:
        raise InputError("t_eval must be non-decreasing and start at or after t0")

    def f(y):
        return network_rhs_torch(y, lap, kap, alp, model, base, cap)

    if method == "rk4":
        if dt is None:
            dt = default_rk4_dt(
                lap.detach().cpu().numpy(), kap.detach().cpu().numpy(), alp.detach().cpu().numpy(),
                None if base is None else base.detach().cpu().numpy(),
                None if cap is None else cap.detach().cpu().numpy(),
            )
        substeps = rk4_substeps(t, t0, float(dt))
        states = []
        y = u
        t_prev = t0
        for k, ns in enumerate(substeps):
            if ns > 0:
                h = (t[k] - t_prev) / ns
                for _ in range(int(ns)):
                    k1 = f(y)
                    k2 = f(y + 0.5 * h * k1)
                    k3 = f(y + 0.5 * h * k2)
                    k4 = f(y + h * k3)
                    y = y + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
            states.append(y)
            t_prev = t[k]
        return torch.stack(states, dim=1)

    from torchdiffeq import odeint

    times = np.concatenate([[t0], t]) if t[0] > t0 else t
    sol = odeint(lambda _t, y: f(y), u, torch.as_tensor(times, device=dev, dtype=dty), method=method,
                 rtol=rtol, atol=atol)
    if t[0] > t0:
        sol = sol[1:]
    return sol.permute(1, 0, 2)
