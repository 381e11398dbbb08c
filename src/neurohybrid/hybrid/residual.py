"""APHYNITY-style parallel residual models (Yin et al. 2021, "Augmenting physical models with deep
networks for complex dynamics forecasting").

    du/dt = f_mech(u; theta) + g_phi(u, covariates)

trained with

    loss = data misfit + lambda * mean_k ||g_phi(u(t_k), covariates)||^2

The penalty keeps the correction as small as the data allow, so whatever the mechanistic model
can explain is explained by theta (which stays interpretable) and g_phi only takes up the
residual physics. With g_phi == 0 the model is exactly the mechanistic one.

The penalty is evaluated on the predicted trajectory at the output times (and the initial state),
the discrete version of APHYNITY's integral over the trajectory.
"""

from __future__ import annotations

import torch
from torch import nn

from neurohybrid.hybrid.neural_ode import HybridDynamics, integrate, repeat_members


class ParallelResidual(nn.Module):
    """Mechanistic right-hand side + learned correction, integrated together.

    mechanistic: callable u (B, N) -> du (B, N) (theta closed over; may hold per-subject tensors).
    correction: module g(u, covariates, lap) -> du, e.g. ``RegionwiseMLP``.
    forward(u0, times, covariates=None, lap=None, t0=None) -> (prediction (B, T, N), penalty (B,))
    where penalty = mean over [u0, u(t_1), ..., u(t_T)] of ||g||^2 (sum over the N components).
    """

    def __init__(self, mechanistic, correction: nn.Module, method: str = "rk4", step_size: float | None = None,
                 adjoint: bool = False):
        super().__init__()
        self.dynamics = HybridDynamics(mechanistic, correction)
        self.method = method
        self.step_size = step_size
        self.adjoint = adjoint

    def forward(self, u0, times, covariates=None, lap=None, t0=None):
        self.dynamics.set_context(covariates, lap)
        pred = integrate(self.dynamics, u0, times, method=self.method, step_size=self.step_size,
                         adjoint=self.adjoint, t0=t0)
        return pred, self.correction_penalty(torch.cat([u0[:, None, :], pred], dim=1))

    def correction_penalty(self, states: torch.Tensor) -> torch.Tensor:
        """mean over time of ||g(u(t))||^2 for states (B, T, N) -> (B,)."""
        bsz, nt, n = states.shape
        flat = states.reshape(bsz * nt, n)
        cov = repeat_members(self.dynamics.covariates, bsz, nt)
        lap = repeat_members(self.dynamics.lap, bsz, nt)
        g = self.dynamics.correction(flat, cov, lap) if self.dynamics.correction is not None \
            else torch.zeros_like(flat)
        return (g ** 2).sum(dim=-1).reshape(bsz, nt).mean(dim=1)


def aphynity_loss(pred: torch.Tensor, observed: torch.Tensor, penalty: torch.Tensor, lam: float,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, misfit, penalty): misfit = mean squared error over observed entries, plus lam * mean penalty.

    mask: optional boolean/0-1 tensor broadcastable to pred marking observed entries (visits that exist).
    """
    err = (pred - observed) ** 2
    if mask is not None:
        m = mask.to(err.dtype).expand_as(err)
        misfit = (err * m).sum() / m.sum().clamp_min(1.0)
    else:
        misfit = err.mean()
    pen = penalty.mean()
    return misfit + lam * pen, misfit, pen
