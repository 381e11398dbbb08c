"""Per-subject calibration of mechanistic parameters, with a cheap uncertainty.

* ``calibrate_gradient``: Adam (then optionally L-BFGS) through a differentiable torch twin, from
  several starting points; parameters live in an unconstrained space mapped onto box bounds
  (``Bounds``: logit of the position in [lo, hi], in log space for positive scale parameters), so
  no step leaves the physical range.
* ``calibrate_derivative_free``: scipy Nelder-Mead (from several starts, each with an initial
  simplex spanning a fixed fraction of the box: ``initial_simplex``) or differential evolution
  for losses without gradients (Numba solvers, thresholded observations).
* ``laplace_covariance``: inverse Hessian of a negative log-likelihood at the optimum
  (``torch.autograd.functional.hessian``), i.e. the Laplace approximation of the posterior.
  ``gaussian_nll`` turns a sum of squared residuals into that NLL with the noise variance
  estimated from the residuals.
* ``restart_spread``: the standard deviation of the restarts that reached (near) the best loss, an
  ensemble-style uncertainty when the Hessian is unreliable.

Every result is a ``CalibrationResult`` with the natural-space parameters as numpy arrays.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np
import torch


@dataclasses.dataclass
class Bounds:
    """Box bounds per parameter; ``log`` marks positive parameters searched in log space."""

    lower: Sequence[float]
    upper: Sequence[float]
    log: Sequence[bool] | None = None

    def __post_init__(self):
        self.lower = np.asarray(self.lower, dtype=np.float64).ravel()
        self.upper = np.asarray(self.upper, dtype=np.float64).ravel()
        if self.lower.shape != self.upper.shape or np.any(self.upper <= self.lower):
            raise ValueError("bounds need lower < upper for every parameter")
        self.log = np.zeros(self.lower.size, bool) if self.log is None else np.asarray(self.log, bool).ravel()
        if np.any(self.log & (self.lower <= 0)):
            raise ValueError("log-scaled parameters need positive lower bounds")

    @property
    def size(self) -> int:
        return int(self.lower.size)

    def search_box(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) in the search coordinates: the log of the bounds where ``log`` is set."""
        lo = np.where(self.log, np.log(np.where(self.log, self.lower, 1.0)), self.lower)
        hi = np.where(self.log, np.log(np.where(self.log, self.upper, 1.0)), self.upper)
        return lo, hi

    def _ends(self, like: torch.Tensor):
        lo, hi = self.search_box()
        return torch.as_tensor(lo, dtype=like.dtype, device=like.device), torch.as_tensor(hi, dtype=like.dtype, device=like.device)

    def to_natural(self, z: torch.Tensor) -> torch.Tensor:
        """Unconstrained z -> parameters inside the bounds (differentiable)."""
        lo, hi = self._ends(z)
        s = lo + (hi - lo) * torch.sigmoid(z)
        mask = torch.as_tensor(self.log, device=z.device)
        theta = torch.where(mask, torch.exp(s), s)
        # exp(log(hi)) can overshoot hi by one ulp
        return torch.minimum(torch.maximum(theta, torch.as_tensor(self.lower, dtype=z.dtype, device=z.device)),
                             torch.as_tensor(self.upper, dtype=z.dtype, device=z.device))

    def to_unconstrained(self, theta) -> np.ndarray:
        theta = np.asarray(theta, dtype=np.float64).ravel()
        s = np.where(self.log, np.log(np.clip(theta, 1e-300, None)), theta)
        lo, hi = self.search_box()
        return _logit((s - lo) / (hi - lo))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n points uniform in the (log-)box: restart starting points."""
        lo, hi = self.search_box()
        s = lo + (hi - lo) * rng.random((n, self.size))
        return np.where(self.log, np.exp(s), s)


def _logit(p) -> np.ndarray:
    """Inverse of the sigmoid in ``Bounds.to_natural``; positions at the bounds are pulled 1e-6 inside
    so they map to finite points."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclasses.dataclass
class CalibrationResult:
    theta: np.ndarray                      # best parameters (natural space)
    loss: float                            # loss at theta
    restarts: list[tuple[np.ndarray, float]]  # (theta, loss) of every restart
    history: list[float]                   # loss per iteration of the best restart
    seconds: float
    method: str
    covariance: np.ndarray | None = None
    std: np.ndarray | None = None

    def as_dict(self, names: Sequence[str] | None = None) -> dict:
        names = list(names) if names is not None else [f"theta{i}" for i in range(self.theta.size)]
        out = {n: float(v) for n, v in zip(names, self.theta)}
        if self.std is not None:
            out.update({f"{n}_sd": float(v) for n, v in zip(names, self.std)})
        out["calibration_loss"] = float(self.loss)
        out["calibration_method"] = self.method
        return out


def _starts(bounds: Bounds, n_restarts: int, init, seed: int, spread: float | None = None) -> np.ndarray:
    """``init`` (when given) then starts uniform in the box, or, with ``spread`` and ``init``, normal
    around init with a standard deviation of ``spread`` times the box width (in log space where
    marked), clipped to the box."""
    rng = np.random.default_rng(seed)
    first = [] if init is None else [np.asarray(init, dtype=np.float64).ravel()]
    n_rest = max(0, n_restarts - len(first))
    if spread is not None and first:
        lo, hi = bounds.search_box()
        s0 = np.where(bounds.log, np.log(np.clip(first[0], 1e-300, None)), first[0])
        s = np.clip(s0 + rng.normal(0.0, spread, (n_rest, bounds.size)) * (hi - lo), lo, hi)
        rest = np.where(bounds.log, np.exp(s), s)
    else:
        rest = bounds.sample(n_rest, rng)
    return np.vstack(first + [rest]) if len(rest) else np.vstack(first)


def calibrate_gradient(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    bounds: Bounds,
    *,
    init=None,
    n_restarts: int = 4,
    steps: int = 150,
    lr: float = 0.1,
    lbfgs_steps: int = 0,
    seed: int = 0,
    dtype=torch.float64,
    device=None,
    tol: float = 1e-12,
    batched: bool = False,
) -> CalibrationResult:
    """Minimise loss_fn(theta) (theta: natural-space tensor of shape (P,)) from n_restarts starts.

    The first start is ``init`` when given, the others uniform in the bounds. Each start runs
    ``steps`` Adam iterations in the unconstrained space, then ``lbfgs_steps`` L-BFGS iterations
    (strong Wolfe line search) to polish. Stops a start early when the loss changes by < tol
    (relative) over 10 iterations.

    batched=True: loss_fn takes all restarts at once, theta (R, P) -> losses (R,), and the R
    restarts are optimised together (one batched solver call per iteration instead of R; the
    restarts stay independent because Adam is elementwise and the summed loss separates).
    """
    start_time = time.perf_counter()
    if batched:
        return calibrate_gradient_many(loss_fn, bounds, 1, init=None if init is None else [init], n_restarts=n_restarts,
                                       steps=steps, lr=lr, lbfgs_steps=lbfgs_steps, seed=seed, dtype=dtype,
                                       device=device, tol=tol)[0]
    starts = _starts(bounds, n_restarts, init, seed)
    runs = [_calibrate_one(loss_fn, bounds, x0, steps, lr, lbfgs_steps, dtype, device, tol) for x0 in starts]
    best = min(runs, key=lambda r: r[1])
    return CalibrationResult(best[0], best[1], [(r[0], r[1]) for r in runs], best[2],
                             time.perf_counter() - start_time, "gradient")


def calibrate_gradient_many(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    bounds: Bounds,
    n_problems: int,
    *,
    init: Sequence | None = None,
    n_restarts: int = 4,
    steps: int = 150,
    lr: float = 0.1,
    lbfgs_steps: int = 0,
    seed: int = 0,
    dtype=torch.float64,
    device=None,
    tol: float = 1e-12,
) -> list[CalibrationResult]:
    """Calibrate ``n_problems`` independent problems (e.g. subjects) with ``n_restarts`` starts each,
    all in one batched loss per iteration.

    loss_fn(theta (n_problems * n_restarts, P)) -> (n_problems * n_restarts,) losses, rows
    problem-major (row = problem * n_restarts + restart). init: optional per-problem first start.
    Returns one ``CalibrationResult`` per problem (its best restart).
    """
    start_time = time.perf_counter()
    starts = np.vstack([
        _starts(bounds, n_restarts, None if init is None else init[p], seed + 7919 * p) for p in range(n_problems)
    ])
    runs = _calibrate_batched(loss_fn, bounds, starts, steps, lr, lbfgs_steps, dtype, device, tol)
    seconds = (time.perf_counter() - start_time) / max(n_problems, 1)
    out = []
    for p in range(n_problems):
        mine = runs[p * n_restarts:(p + 1) * n_restarts]
        best = min(mine, key=lambda r: r[1])
        out.append(CalibrationResult(best[0], best[1], [(r[0], r[1]) for r in mine], best[2], seconds, "gradient"))
    return out


def _lbfgs(z, objective, lbfgs_steps):
    lb = torch.optim.LBFGS([z], lr=1.0, max_iter=int(lbfgs_steps), line_search_fn="strong_wolfe")
    before = z.detach().clone()

    def closure():
        lb.zero_grad()
        val = objective()
        val.backward()
        return val

    try:
        lb.step(closure)
    except RuntimeError:  # a non-finite line-search trial: keep the Adam result
        pass
    if not torch.all(torch.isfinite(z)):
        with torch.no_grad():
            z.copy_(before)


def _calibrate_one(loss_fn, bounds, x0, steps, lr, lbfgs_steps, dtype, device, tol):
    z = torch.tensor(bounds.to_unconstrained(x0), dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    hist: list[float] = []
    for it in range(int(steps)):
        opt.zero_grad()
        loss = loss_fn(bounds.to_natural(z))
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
        if it >= 10 and abs(hist[-11] - hist[-1]) <= tol * max(abs(hist[-1]), 1e-30):
            break
    if lbfgs_steps > 0:
        _lbfgs(z, lambda: loss_fn(bounds.to_natural(z)), lbfgs_steps)
    with torch.no_grad():
        theta = bounds.to_natural(z)
        final = float(loss_fn(theta))
    hist.append(final)
    return theta.detach().cpu().numpy().astype(np.float64), final if np.isfinite(final) else np.inf, hist


def _calibrate_batched(loss_fn, bounds, starts, steps, lr, lbfgs_steps, dtype, device, tol):
    z = torch.tensor(np.stack([bounds.to_unconstrained(x) for x in starts]), dtype=dtype, device=device,
                     requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    hist: list[np.ndarray] = []
    for it in range(int(steps)):
        opt.zero_grad()
        losses = loss_fn(bounds.to_natural(z))
        finite = torch.isfinite(losses)
        if not torch.any(finite):
            break
        # a diverged restart drops out of the sum (its gradient is zero) instead of poisoning the rest
        torch.where(finite, losses, torch.zeros_like(losses)).sum().backward()
        opt.step()
        hist.append(losses.detach().cpu().numpy())
        if it >= 10:
            old, new = hist[-11], hist[-1]
            if np.all(np.abs(old - new) <= tol * np.maximum(np.abs(new), 1e-30)):
                break
    if lbfgs_steps > 0:
        def total():
            losses = loss_fn(bounds.to_natural(z))
            return torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses)).sum()
        _lbfgs(z, total, lbfgs_steps)
    with torch.no_grad():
        theta = bounds.to_natural(z)
        final = loss_fn(theta).detach().cpu().numpy()
    runs = []
    for r in range(len(starts)):
        h = [float(v[r]) for v in hist] + [float(final[r])]
        runs.append((theta[r].detach().cpu().numpy().astype(np.float64), float(final[r]) if np.isfinite(final[r]) else np.inf, h))
    return runs


def initial_simplex(bounds: Bounds, theta0, fraction: float = 0.1) -> np.ndarray:
    """Nelder-Mead starting simplex in the unconstrained space around theta0 (natural space): vertex
    i moves parameter i by ``fraction`` of its search-box width (in log space where marked), towards
    the larger side of the box.

    Needed because scipy's default simplex moves each coordinate by 5% of its value, and 0.00025
    where it is 0: a start in the middle of the box is z = 0 in the logit space, so the default
    simplex spans ~1e-4 of the box and, on a loss that is flat at that scale (thresholded masks,
    adaptive solvers), Nelder-Mead shrinks onto its start and stops there.
    """
    if not 0.0 < fraction <= 0.5:
        raise ValueError("simplex fraction must be in (0, 0.5]")
    lo, hi = bounds.search_box()
    theta0 = np.asarray(theta0, dtype=np.float64).ravel()
    s0 = np.where(bounds.log, np.log(np.clip(theta0, 1e-300, None)), theta0)
    p0 = np.clip((s0 - lo) / (hi - lo), 1e-6, 1 - 1e-6)
    p1 = np.where(p0 <= 0.5, p0 + fraction, p0 - fraction)
    z0 = _logit(p0)
    vertices = np.tile(z0, (bounds.size + 1, 1))
    vertices[1 + np.arange(bounds.size), np.arange(bounds.size)] = _logit(p1)
    return vertices


def calibrate_derivative_free(
    loss_fn: Callable[[np.ndarray], float],
    bounds: Bounds,
    *,
    method: str = "nelder-mead",
    init=None,
    n_restarts: int = 4,
    maxiter: int = 300,
    max_evals: int | None = None,
    simplex_fraction: float = 0.1,
    start_spread: float | None = None,
    seed: int = 0,
) -> CalibrationResult:
    """Minimise a numpy loss_fn(theta) without gradients.

    "nelder-mead": scipy's simplex in the unconstrained space from n_restarts starts (``init`` first
    when given, the others uniform in the box or, with ``start_spread``, local restarts: normal
    around init with that fraction of the box width as standard deviation, so that a small
    evaluation budget is spent near an informed start and the restarts that reach the best loss
    measure its spread), each with an initial simplex spanning
    ``simplex_fraction`` of the box per parameter (``initial_simplex``) and at most ``maxiter``
    iterations / ``max_evals`` loss evaluations (per start). Non-finite losses count as 1e300.
    "differential_evolution": scipy's global search inside the box (in log space where marked),
    polished by L-BFGS-B on finite differences (scipy's default).
    """
    from scipy.optimize import differential_evolution, minimize

    start_time = time.perf_counter()
    runs = []
    if method == "nelder-mead":
        for x0 in _starts(bounds, n_restarts, init, seed, start_spread):
            hist: list[float] = []

            def f(z, hist=hist):  # bound now: each restart keeps its own history
                with torch.no_grad():
                    theta = bounds.to_natural(torch.as_tensor(z, dtype=torch.float64)).numpy()
                val = float(loss_fn(theta))
                hist.append(val)
                return val if np.isfinite(val) else 1e300

            simplex = initial_simplex(bounds, x0, simplex_fraction)
            options = {"maxiter": maxiter, "xatol": 1e-6, "fatol": 1e-12, "initial_simplex": simplex}
            if max_evals is not None:
                options["maxfev"] = int(max_evals)
            res = minimize(f, simplex[0], method="Nelder-Mead", options=options)
            theta = bounds.to_natural(torch.as_tensor(res.x, dtype=torch.float64)).numpy()
            runs.append((theta, float(res.fun), hist))
    elif method == "differential_evolution":
        lo, hi = bounds.search_box()
        hist = []

        def g(s):
            val = float(loss_fn(np.where(bounds.log, np.exp(s), s)))
            hist.append(val)
            return val if np.isfinite(val) else 1e300

        res = differential_evolution(g, list(zip(lo, hi)), seed=seed, maxiter=maxiter, tol=1e-10, polish=True)
        runs.append((np.where(bounds.log, np.exp(res.x), res.x), float(res.fun), hist))
    else:
        raise ValueError(f"unknown derivative-free method {method!r}: use nelder-mead or differential_evolution")
    best = min(runs, key=lambda r: r[1])
    return CalibrationResult(best[0], best[1], [(r[0], r[1]) for r in runs], best[2],
                             time.perf_counter() - start_time, method)


def gaussian_nll(sse: torch.Tensor, n_obs: int, sigma2: float) -> torch.Tensor:
    """Negative log-likelihood (up to a constant) of n_obs Gaussian residuals with variance sigma2,
    given their sum of squares: sse / (2 sigma2). Use with ``laplace_covariance``."""
    del n_obs  # the constant term does not affect the Hessian
    return sse / (2.0 * sigma2)


def laplace_covariance(nll_fn: Callable[[torch.Tensor], torch.Tensor], theta, *, dtype=torch.float64,
                       device=None) -> tuple[np.ndarray, np.ndarray]:
    """(covariance, standard deviations) of the Laplace approximation at ``theta``: the inverse of
    the Hessian of the negative log-likelihood. A Hessian that is not positive definite (a flat
    or saddle direction) is projected onto its positive eigenvalues; unidentifiable directions
    get an infinite standard deviation rather than a made-up one."""
    x = torch.as_tensor(np.asarray(theta, dtype=np.float64), dtype=dtype, device=device)
    hess = torch.autograd.functional.hessian(lambda t: nll_fn(t), x).detach().cpu().numpy().astype(np.float64)
    hess = 0.5 * (hess + hess.T)
    w, v = np.linalg.eigh(hess)
    scale = max(float(np.abs(w).max()), 1e-300)
    good = w > 1e-10 * scale
    inv_w = np.where(good, 1.0 / np.where(good, w, 1.0), 0.0)
    cov = (v * inv_w) @ v.T
    # a direction without curvature: infinite variance for the parameters it involves
    flat = (np.abs(v[:, ~good]) > 1e-6).any(axis=1) if (~good).any() else np.zeros(x.numel(), bool)
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    std = np.where(flat, np.inf, std)
    return cov, std


def restart_spread(result: CalibrationResult, rel_tol: float = 0.05, log=None) -> np.ndarray:
    """Std of the restarts whose loss is within rel_tol of the best (ensemble-style uncertainty);
    of log(theta) for the parameters marked in ``log`` (e.g. ``Bounds.log``). Zeros when fewer than
    two restarts qualify."""
    good = [t for t, loss in result.restarts if np.isfinite(loss) and loss <= result.loss * (1 + rel_tol) + 1e-12]
    if len(good) < 2:
        return np.zeros_like(result.theta)
    good = np.vstack(good)
    if log is not None:
        log = np.asarray(log, bool)
        good = np.where(log, np.log(np.where(log, good, 1.0)), good)
    return np.std(good, axis=0)
