"""Solver-in-the-loop (Um et al. 2020, "Solver-in-the-Loop: Learning from Differentiable Physics to
Interact with Iterative PDE-Solvers"), the series hybrid.

A cheap coarse solver step (a larger time step or a coarser grid) is followed by a learned
correction of its state:

    u_{k+1} = clamp(c(u_k) + g(c(u_k)) h_phi(c(u_k), context))       (``CorrectedSolver.step``)

g gates the correction by the state (zero where there is no disease) and the clamp keeps the
state in its valid range. ``fit_correction`` trains, validates over the whole horizon on held-out
trajectories, and falls back to the plain coarse solver when the correction does not help there.

Two ways to train the SAME network (the only difference is the training target):

* ``train_sol(model, fine, n_unroll=n)`` -- SOL-n: start from a fine-solver state, unroll n
  corrected coarse steps *through the differentiable solver*, and match the fine solver's next n
  states. The network sees (and learns to undo) the states its own corrections produce.
* ``train_precomputed(model, fine)`` -- the non-interacting baseline ("NON" in Um et al.):
  pre-computed pairs (c(fine_k), fine_{k+1}): one coarse step from each fine state, computed once
  without gradients; the network never sees its own outputs.

``fine`` is a trajectory of the fine (reference) solver sampled at the coarse step times:
(B, K+1, N) or (B, K+1, X, Y, Z) (any trailing state shape; steps and corrections see (M, ...)).
With n_unroll=1 both targets coincide (one step from a fine state), which the tests
use to check that the two differ only in the targets.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from neurohybrid.hybrid.neural_ode import repeat_members
from neurohybrid.hybrid.training import TrainResult, train_loop


def logistic_gate(u: torch.Tensor, lower=0.0, upper=1.0) -> torch.Tensor:
    """4 (u - lower)(upper - u) / (upper - lower)^2, clamped at 0: 1 in mid-range, exactly 0 where
    the state is at its disease-free value (``lower``) or saturated (``upper``). Multiplying a
    correction by it keeps the correction off healthy tissue (Fisher-KPP's own reaction term has
    the same form)."""
    width = upper - lower
    return torch.clamp(4.0 * (u - lower) * (upper - u) / (width * width), min=0.0)


def unit_range(u: torch.Tensor, covariates=None) -> tuple[float, float]:
    """The default valid range of a state: [0, 1] (a density or a dead fraction)."""
    return 0.0, 1.0


class CorrectedSolver(nn.Module):
    """A coarse step u -> u_next (any differentiable callable) with a learned state correction.

    coarse_step(u (B, N), covariates) -> (B, N): covariates is the per-member context tensor
    (B, N, C) (or shared (1, N, C), or None) that is also handed to the correction; per-member
    solver parameters (e.g. each subject's kappa) travel in it, so that batches of start states
    built by repeating members stay aligned with their parameters.
    correction: module h(u, covariates, lap) -> (B, N), e.g. ``RegionwiseMLP`` (zero-initialised,
    so an untrained model is the plain coarse solver).
    ``lap`` (set_context) is a shared (N, N) or per-member (B, N, N) operator handed to the
    correction; it is repeated with the covariates when start states are batched, so a coarse
    step that needs it reads ``model.lap`` at call time.

    The correction respects the physics: it is multiplied by ``gate(u_coarse, covariates)``
    (default ``logistic_gate`` on ``state_range``), so it is exactly zero where there is no
    disease, and the corrected state is clamped to ``state_range(u, covariates) -> (lower, upper)``
    (floats or tensors broadcasting with u; default [0, 1]). ``use_correction = False`` is the plain
    coarse solver (the fall-back when the correction does not beat it on validation).
    """

    def __init__(self, coarse_step: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], correction: nn.Module, *,
                 state_range: Callable = unit_range, gate: Callable | None = None):
        super().__init__()
        self.coarse_step = coarse_step
        self.correction = correction
        self.state_range = state_range
        self.gate = gate if gate is not None else (lambda u, cov: logistic_gate(u, *state_range(u, cov)))
        self.use_correction = True
        self.covariates = None
        self.lap = None

    def set_context(self, covariates=None, lap=None):
        self.covariates = covariates
        self.lap = lap
        return self

    def correct(self, u_coarse: torch.Tensor, covariates=None) -> torch.Tensor:
        if not self.use_correction:
            return u_coarse
        cov = self.covariates if covariates is None else covariates
        lower, upper = self.state_range(u_coarse, cov)
        u = u_coarse + self.gate(u_coarse, cov) * self.correction(u_coarse, cov, self.lap)
        return torch.minimum(torch.maximum(u, torch.as_tensor(lower, dtype=u.dtype, device=u.device)),
                             torch.as_tensor(upper, dtype=u.dtype, device=u.device))

    def step(self, u: torch.Tensor) -> torch.Tensor:
        return self.correct(self.coarse_step(u, self.covariates))

    def rollout(self, u0: torch.Tensor, n_steps: int) -> torch.Tensor:
        """States after 1..n_steps corrected steps: (B, n_steps, ...)."""
        states = []
        u = u0
        for _ in range(int(n_steps)):
            u = self.step(u)
            states.append(u)
        return torch.stack(states, dim=1)


def _check_fine(fine: torch.Tensor) -> None:
    if fine.ndim < 3 or fine.shape[1] < 2:
        raise ValueError(f"fine trajectories must be (B, K+1, ...) with K >= 1 steps, got {tuple(fine.shape)}")


def _weighted_mean(sq: torch.Tensor, weights) -> torch.Tensor:
    """Mean of squared errors sq (B, ...); with per-trajectory weights (B,), each trajectory's mean
    is weighted (weights are relative: divided by their mean over the batch)."""
    if weights is None:
        return sq.mean()
    w = weights.to(sq.dtype)
    return (sq.reshape(sq.shape[0], -1).mean(dim=1) * w).sum() / w.sum()


def sol_loss(model: CorrectedSolver, fine: torch.Tensor, n_unroll: int, covariates=None, weights=None) -> torch.Tensor:
    """SOL-n loss: from every fine state k (with k + n <= K), unroll n corrected coarse steps and
    compare with fine states k+1..k+n (mean squared error over steps, members and components).
    covariates default to the model's context (``set_context``). weights: optional (B,) relative
    weights of the trajectories (e.g. the inverse of each one's coarse error scale, so that small
    and large errors count alike); None: the plain mean."""
    _check_fine(fine)
    covariates = model.covariates if covariates is None else covariates
    bsz, kp1, rest = fine.shape[0], fine.shape[1], tuple(fine.shape[2:])
    n_unroll = max(1, min(int(n_unroll), kp1 - 1))
    starts = kp1 - n_unroll  # start indices 0..K-n
    u0 = fine[:, :starts].reshape(bsz * starts, *rest)
    saved = model.covariates, model.lap
    model.covariates, model.lap = _repeat(covariates, bsz, starts), _repeat(model.lap, bsz, starts)
    try:
        pred = model.rollout(u0, n_unroll)  # (bsz*starts, n_unroll, *rest)
    finally:
        model.covariates, model.lap = saved
    target = torch.stack([fine[:, s + 1:s + 1 + n_unroll] for s in range(starts)], dim=1)
    return _weighted_mean(((pred - target.reshape(bsz * starts, n_unroll, *rest)) ** 2).reshape(bsz, -1), weights)


def _repeat(cov, bsz, times):
    """Align per-member covariates (B, N, C) with B*times start states (member-major)."""
    return repeat_members(cov, bsz, times)


def precomputed_pairs(model: CorrectedSolver, fine: torch.Tensor, covariates=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse step of every fine state, next fine state), computed once without gradients:
    shapes (B, K, N) each."""
    _check_fine(fine)
    covariates = model.covariates if covariates is None else covariates
    bsz, kp1, rest = fine.shape[0], fine.shape[1], tuple(fine.shape[2:])
    saved = model.lap
    model.lap = _repeat(model.lap, bsz, kp1 - 1)
    try:
        with torch.no_grad():
            cov = _repeat(covariates, bsz, kp1 - 1)
            inputs = model.coarse_step(fine[:, :-1].reshape(bsz * (kp1 - 1), *rest), cov).reshape(bsz, kp1 - 1, *rest)
    finally:
        model.lap = saved
    return inputs.detach(), fine[:, 1:].detach()


def precomputed_loss(model: CorrectedSolver, inputs: torch.Tensor, targets: torch.Tensor, covariates=None,
                     weights=None) -> torch.Tensor:
    bsz, k, rest = inputs.shape[0], inputs.shape[1], tuple(inputs.shape[2:])
    cov = _repeat(model.covariates if covariates is None else covariates, bsz, k)
    saved = model.lap
    model.lap = _repeat(model.lap, bsz, k)
    try:
        pred = model.correct(inputs.reshape(bsz * k, *rest), cov).reshape(bsz, k, *rest)
    finally:
        model.lap = saved
    return _weighted_mean((pred - targets) ** 2, weights)


def _select(cov, idx, n_items):
    if cov is None or cov.ndim < 3 or cov.shape[0] != n_items or n_items == 1:
        return cov
    return cov[idx]


def _pick(weights, idx):
    return None if weights is None else weights[idx]


def train_sol(model: CorrectedSolver, fine: torch.Tensor, *, n_unroll: int = 4, covariates=None, weights=None,
              **train_kw) -> TrainResult:
    """Train the correction by unrolling ``n_unroll`` differentiable coarse steps (SOL-n).

    fine: (B, K+1, N) fine-solver trajectories at the coarse step times (one item per member B).
    covariates: (B, N, C) per member or shared (1, N, C)/None. weights: optional (B,) relative
    loss weights of the trajectories (``sol_loss``). train_kw: ``train_loop`` options.
    """
    full_lap, n = model.lap, fine.shape[0]
    covariates = model.covariates if covariates is None else covariates

    def loss_fn(idx):
        model.lap = _select(full_lap, idx, n)
        try:
            return sol_loss(model, fine[idx], n_unroll, _select(covariates, idx, n), _pick(weights, idx))
        finally:
            model.lap = full_lap

    return train_loop(model.correction, loss_fn, n, **train_kw)


def train_precomputed(model: CorrectedSolver, fine: torch.Tensor, *, covariates=None, weights=None,
                      **train_kw) -> TrainResult:
    """Train the same correction on pre-computed one-step targets (no solver interaction)."""
    covariates = model.covariates if covariates is None else covariates
    inputs, targets = precomputed_pairs(model, fine, covariates)

    full_lap, n = model.lap, fine.shape[0]

    def loss_fn(idx):
        model.lap = _select(full_lap, idx, n)
        try:
            return precomputed_loss(model, inputs[idx], targets[idx], _select(covariates, idx, n), _pick(weights, idx))
        finally:
            model.lap = full_lap

    return train_loop(model.correction, loss_fn, n, **train_kw)


def relative_l2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """||pred - target|| / ||target|| over everything (steps, members, components)."""
    return float(torch.linalg.vector_norm(pred - target) / torch.clamp(torch.linalg.vector_norm(target), min=1e-12))


def horizon_errors(model: CorrectedSolver, fine: torch.Tensor, covariates=None, error_fn=relative_l2) -> dict:
    """Error of the corrected and of the plain coarse solver over the whole horizon: K steps from
    each trajectory's first fine state against fine states 1..K (``error_fn(pred, target)``,
    default relative L2)."""
    _check_fine(fine)
    covariates = model.covariates if covariates is None else covariates
    saved = model.covariates, model.use_correction
    out = {}
    try:
        model.covariates = covariates
        with torch.no_grad():
            for key, use in (("corrected", True), ("coarse", False)):
                model.use_correction = use
                out[key] = error_fn(model.rollout(fine[:, 0], fine.shape[1] - 1), fine[:, 1:])
    finally:
        model.covariates, model.use_correction = saved
    return out


def fit_correction(model: CorrectedSolver, fine: torch.Tensor, covariates=None, *, precomputed: bool, n_unroll: int,
                   error_fn=relative_l2, weights=None, **train_kw) -> dict:
    """Train the correction (SOL-n, or on pre-computed one-step targets), then check it where it was
    not trained: over the whole horizon of the validation trajectories (held-out parameter draws,
    ``train_kw['val_fraction']``; the training ones when there are too few to hold any out). A
    correction that is not better than the plain coarse solver there is switched off
    (``use_correction`` False, recorded): the series hybrid then falls back to its coarse solver.

    weights: optional (B,) relative loss weights of the trajectories (both targets; ``sol_loss``).

    Returns the checkpoint: state_dict, use_correction, histories, validation errors, target.
    """
    if precomputed:
        result = train_precomputed(model, fine, covariates=covariates, weights=weights, **train_kw)
    else:
        result = train_sol(model, fine, n_unroll=n_unroll, covariates=covariates, weights=weights, **train_kw)
    held_out = bool(result.val_indices)
    idx = result.val_indices if held_out else result.train_indices
    cov = model.covariates if covariates is None else covariates
    full_lap = model.lap
    model.lap = _select(full_lap, idx, fine.shape[0])  # a per-member operator follows its members
    try:
        errors = horizon_errors(model, fine[idx], _select(cov, idx, fine.shape[0]), error_fn)
    finally:
        model.lap = full_lap
    model.use_correction = errors["corrected"] < errors["coarse"]
    return {"state_dict": model.correction.state_dict(), "use_correction": model.use_correction,
            "history": result.history, "val_history": result.val_history, "best_epoch": result.best_epoch,
            "train_seconds": result.seconds,
            "validation": dict(errors, trajectories=len(idx), held_out=held_out, horizon_steps=int(fine.shape[1] - 1)),
            "training_target": "precomputed one-step" if precomputed else f"SOL-{int(n_unroll)} unrolled"}


def load_correction(model: CorrectedSolver, checkpoint: dict) -> CorrectedSolver:
    """Restore a ``fit_correction`` checkpoint (its fall-back decision included)."""
    model.correction.load_state_dict(checkpoint["state_dict"])
    model.use_correction = bool(checkpoint.get("use_correction", True))
    return model


def time_call(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of fn() in seconds (the cost used for speed-up at equal accuracy)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        best = min(best, time.perf_counter() - start)
    return best
