"""Neural ODEs and universal differential equations, integrated with torchdiffeq.

A universal differential equation (UDE) is

    du/dt = f_mech(u; theta) + g_phi(u, covariates)

with f_mech a known mechanistic right-hand side (or None: a pure neural ODE) and g_phi a network.
``HybridDynamics`` holds both; ``integrate`` solves it with ``torchdiffeq.odeint`` (or
``odeint_adjoint`` when memory matters: the adjoint method back-propagates by solving the
adjoint ODE backwards instead of storing every step).

Shapes: u is (B, N) (a batch of B subjects, N state variables, e.g. brain regions); times are a
1D increasing tensor/array shared by the batch. Returns (B, T, N), like the solvers' twins.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

MechanisticRHS = Callable[[torch.Tensor], torch.Tensor]


class RegionwiseMLP(nn.Module):
    """g(u, covariates) -> du: one small MLP shared by every region (or voxel).

    Input features per region: the state u_i, optionally the transported state (L u)_i (so the
    network sees neighbours through the connectome without a parameter per region), and C
    regional covariates (e.g. normalised volume). Sharing weights across regions keeps the
    parameter count tiny, which is what a cohort of a few subjects can train.

    forward(u (B, N), covariates (B, N, C) or None, lap (N, N), per-member (B, N, N), or None) -> (B, N)
    ``zero_init`` makes the last layer output exactly 0 at start (a hybrid starts as its
    mechanistic model).
    """

    def __init__(self, n_covariates: int = 0, hidden: int = 16, use_transport: bool = True, zero_init: bool = True,
                 depth: int = 2):
        super().__init__()
        self.n_covariates = int(n_covariates)
        self.use_transport = bool(use_transport)
        n_in = 1 + int(use_transport) + self.n_covariates
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(max(1, depth - 1)):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        last = nn.Linear(width, 1)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def features(self, u, covariates=None, lap=None):
        feats = [u[..., None]]
        if self.use_transport:
            if lap is None:
                raise ValueError("RegionwiseMLP(use_transport=True) needs the Laplacian")
            feats.append(transport(u, lap)[..., None])
        if self.n_covariates:
            if covariates is None:
                raise ValueError(f"RegionwiseMLP expects {self.n_covariates} covariates per region")
            feats.append(covariates.expand(u.shape[0], *covariates.shape[-2:]))
        return torch.cat(feats, dim=-1)

    def forward(self, u, covariates=None, lap=None):
        return self.net(self.features(u, covariates, lap)).squeeze(-1)


def transport(u: torch.Tensor, lap: torch.Tensor) -> torch.Tensor:
    """L u for u (B, N) with one Laplacian (N, N) or one per member (B, N, N)."""
    if lap.ndim == 3:
        return torch.einsum("bij,bj->bi", lap, u)
    return u @ lap.T


def repeat_members(x, bsz: int, times: int):
    """Align a per-member tensor (B, ...) with B*times member-major rows; shared tensors pass through."""
    if torch.is_tensor(x) and x.ndim == 3 and x.shape[0] == bsz and bsz > 1:
        return x.repeat_interleave(times, dim=0)
    return x


class ZeroCorrection(nn.Module):
    """A correction that is identically zero: the hybrid reduces to its mechanistic model."""

    def forward(self, u, covariates=None, lap=None):
        return torch.zeros_like(u)


class HybridDynamics(nn.Module):
    """du/dt = f_mech(u) + g(u, covariates): the parallel (additive) hybrid right-hand side.

    mechanistic: callable u -> du (the parameters theta are closed over or are attributes of a
        module passed here; may be None for a pure neural ODE).
    correction: module g(u, covariates, lap) -> du (may be None for a pure mechanistic model).
    covariates, lap: fixed inputs of g for the current batch (set with ``set_context``).

    ``nfe`` counts right-hand-side evaluations (solver cost).
    """

    def __init__(self, mechanistic: MechanisticRHS | None, correction: nn.Module | None):
        super().__init__()
        if mechanistic is None and correction is None:
            raise ValueError("HybridDynamics needs a mechanistic part, a correction, or both")
        self.mechanistic = mechanistic
        self.correction = correction
        self.covariates = None
        self.lap = None
        self.nfe = 0

    def set_context(self, covariates=None, lap=None):
        self.covariates = covariates
        self.lap = lap
        return self

    def correction_term(self, u):
        if self.correction is None:
            return torch.zeros_like(u)
        return self.correction(u, self.covariates, self.lap)

    def forward(self, t, u):
        self.nfe += 1
        du = self.mechanistic(u) if self.mechanistic is not None else torch.zeros_like(u)
        if self.correction is not None:
            du = du + self.correction_term(u)
        return du


def integrate(func: Callable, u0: torch.Tensor, times, *, method: str = "rk4", step_size: float | None = None,
              adjoint: bool = False, rtol: float = 1e-5, atol: float = 1e-7, t0: float | None = None) -> torch.Tensor:
    """Solve du/dt = func(t, u) from u0 (B, N) and return the states at ``times`` as (B, T, N).

    times: increasing output times shared by the batch (1D), or per-member times (B, T) for
        subjects seen at different ages (then func must be autonomous, see below).
    t0: start time (default: times[0], or 0 for per-member times); when earlier than the first
        output time the initial state is not returned.
    method: any torchdiffeq method ("rk4", "euler", "dopri5", ...); fixed-step methods use
        ``step_size`` (default: the smallest output gap).
    adjoint=True uses ``odeint_adjoint`` (func must then be an nn.Module).

    Per-member times are solved interval by interval in a rescaled time s in [0, 1]:
    du/ds = (t_{k+1} - t_k) f(u), with per-member interval lengths, so one batched solve serves
    subjects with irregular visits; padded visits with a zero interval leave the state unchanged.
    Each interval takes ceil(max interval / step_size) fixed steps. With method "rk4" (and no
    adjoint) these are classical RK4 steps written out here rather than through torchdiffeq: the
    same scheme as the solvers' torch twins, at a third of torchdiffeq's per-step overhead, which
    dominates for the small regional states of a cohort; any other method (or adjoint=True) goes
    through torchdiffeq.
    """
    from torchdiffeq import odeint, odeint_adjoint

    solver = odeint_adjoint if adjoint else odeint
    if torch.is_tensor(times) and times.ndim == 2 or (not torch.is_tensor(times) and np.ndim(times) == 2):
        return _integrate_per_member(func, u0, times, solver, method, step_size, adjoint, rtol, atol, t0)
    t = torch.as_tensor(np.asarray(times, dtype=np.float64) if not torch.is_tensor(times) else times,
                        dtype=u0.dtype, device=u0.device).reshape(-1)
    prepend = t0 is not None and float(t0) < float(t[0])
    if prepend:
        t = torch.cat([torch.as_tensor([float(t0)], dtype=t.dtype, device=t.device), t])
    options = {}
    if method in _FIXED:
        if step_size is None:
            gaps = torch.diff(t)
            gaps = gaps[gaps > 0]
            step_size = float(gaps.min()) if gaps.numel() else 1.0
        options["step_size"] = float(step_size)
    if t.numel() == 1:
        return u0[:, None, :]
    kwargs = dict(method=method, rtol=rtol, atol=atol, options=options)
    if adjoint:
        kwargs["adjoint_params"] = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
    sol = solver(func, u0, t, **kwargs)
    if prepend:
        sol = sol[1:]
    return sol.permute(1, 0, 2)


_FIXED = ("rk4", "euler", "midpoint", "explicit_adams", "implicit_adams")


class _Rescaled(nn.Module):
    """du/ds = dt (B,) * f(u): one interval of per-member length mapped onto s in [0, 1]."""

    def __init__(self, func, dt):
        super().__init__()
        self.func = func
        self.dt = dt

    def forward(self, s, u):
        return self.dt.reshape(-1, *([1] * (u.ndim - 1))) * self.func(s, u)


def _integrate_per_member(func, u0, times, solver, method, step_size, adjoint, rtol, atol, t0):
    t = torch.as_tensor(times, dtype=u0.dtype, device=u0.device)
    if t.shape[0] != u0.shape[0]:
        raise ValueError(f"per-member times have {t.shape[0]} rows for a batch of {u0.shape[0]}")
    start = torch.zeros_like(t[:, 0]) if t0 is None else torch.as_tensor(t0, dtype=u0.dtype, device=u0.device).expand_as(t[:, 0])
    gaps = torch.diff(torch.cat([start[:, None], t], dim=1), dim=1)
    if torch.any(gaps < 0):
        raise ValueError("per-member times must be non-decreasing and start at or after t0")
    unit = torch.tensor([0.0, 1.0], dtype=u0.dtype, device=u0.device)
    states, u = [], u0
    for k in range(t.shape[1]):
        dt = gaps[:, k]
        longest = float(dt.max())
        if longest > 0 and method == "rk4" and not adjoint:
            n_steps = 1 if step_size is None else max(1, int(np.ceil(longest / float(step_size) - 1e-9)))
            h = (dt / n_steps).reshape(-1, *([1] * (u.ndim - 1)))
            s0 = unit[0]
            for _ in range(n_steps):
                k1 = func(s0, u)
                k2 = func(s0, u + 0.5 * h * k1)
                k3 = func(s0, u + 0.5 * h * k2)
                k4 = func(s0, u + h * k3)
                u = u + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        elif longest > 0:
            options = {}
            if method in _FIXED:
                n_steps = 1 if step_size is None else max(1, int(np.ceil(longest / float(step_size) - 1e-9)))
                options["step_size"] = 1.0 / n_steps
            rescaled = _Rescaled(func, dt)
            kwargs = dict(method=method, rtol=rtol, atol=atol, options=options)
            if adjoint:
                kwargs["adjoint_params"] = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
            u = solver(rescaled, u, unit, **kwargs)[-1]
        states.append(u)
    return torch.stack(states, dim=1)


class NeuralODE(nn.Module):
    """A UDE/neural ODE as one module: ``forward(u0, times, covariates=None, lap=None)`` -> (B, T, N)."""

    def __init__(self, dynamics: HybridDynamics, method: str = "rk4", step_size: float | None = None,
                 adjoint: bool = False):
        super().__init__()
        self.dynamics = dynamics
        self.method = method
        self.step_size = step_size
        self.adjoint = adjoint

    def forward(self, u0, times, covariates=None, lap=None, t0=None):
        self.dynamics.set_context(covariates, lap)
        return integrate(self.dynamics, u0, times, method=self.method, step_size=self.step_size,
                         adjoint=self.adjoint, t0=t0)
