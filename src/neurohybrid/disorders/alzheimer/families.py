"""The Alzheimer's model families (names in ``neurohybrid.disorders.base.FAMILIES``).

Every family forecasts the held-out visit from the same information: the subject's earlier
visits, integrating from the LAST observed visit (``model.make_batch``). Calibration and training
use multiple shooting: every observed visit predicts the next one.

persistence          last observed SUVR carried forward.
mechanistic          per-subject calibration of (kappa, alpha, suvr_amplitude) through the torch
                     twin, with restarts and Laplace standard deviations.
data_driven          graph neural ODE du/dt = g(e, L e, centroid, volume, region embedding) (one
                     MLP shared by all regions), trained on every visit-to-next-visit transition
                     of the training subjects; starts as persistence.
residual             APHYNITY: mechanistic + regional correction relu(e) * h(e, L e, centroid,
                     volume, region embedding) (zero where there is no excess) with penalty
                     lambda ||g||^2; per-training-subject theta and shared g trained jointly; at
                     forecast time the subject's theta is fitted with g frozen.
ude                  the same universal differential equation without the penalty (lambda = 0).
sol                  solver-in-the-loop, an accelerated mechanistic model: one semi-implicit step
                     per ``sol_coarse_dt`` years (exact logistic growth, backward-Euler transport
                     through the subject's spectral Laplacian; stable far beyond forward Euler's
                     limit) followed by a learned correction (coefficients of the step's leading
                     error terms plus a small free remainder) gated by the regional excess and
                     clamped to the model's invariant range, trained by unrolling ``sol_steps``
                     steps against fine RK4 trajectories of prior draws (each trajectory's loss
                     relative to its coarse error, ``sol_weight_power``), falling back to the plain
                     coarse step when it does not help on held-out draws; the forward model of the
                     subject's calibration. The forecast's extra reports its error and cost against
                     the fine solver (``sol_accuracy_and_cost``).
sol_precomputed      the same network and data, trained on pre-computed one-step targets.
amortised            a network from summary features of the observed visits to theta, trained
                     end-to-end through the solver on the training subjects (or on their
                     calibrated parameters); no per-subject optimisation.
amortised_residual   amortised theta + the residual's correction, trained jointly (parallel-series).

Trained families use mini-batches of ``batch_size`` subjects, a validation set of
``val_fraction`` of the fold's training subjects with early stopping (``patience``) and keep
their loss curves (``history``, ``val_history``) in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from neurohybrid.disorders.alzheimer.model import (
    N_FEATURES, Context, RegionCorrection, Settings, Subject, common_regions, correction_state, fit_subjects,
    forecast, laplace_sd, load_correction, make_batch, owner_misfit, predict, theta_dict,
)
from neurohybrid.disorders.base import Family, Forecast, SubjectData, shared_work
from neurohybrid.errors import InputError
from neurohybrid.hybrid.amortised import ParameterNet, train_end_to_end, train_supervised
from neurohybrid.hybrid.neural_ode import HybridDynamics, integrate
from neurohybrid.hybrid.solver_in_loop import CorrectedSolver, fit_correction, logistic_gate, precomputed_pairs, time_call
from neurohybrid.hybrid.training import split_validation, train_loop


class _ADFamily(Family):
    def __init__(self, config, device):
        super().__init__(config, device)
        self.s = Settings.from_config(config or {})
        if self.s.torch_threads > 0:
            # regional states are tiny: extra threads only add synchronisation (and contend with
            # the workflow's other jobs)
            torch.set_num_threads(self.s.torch_threads)

    def _subject(self, inputs: SubjectData) -> Subject:
        subj = Subject.from_inputs(inputs)
        if subj.target_years is None:
            raise InputError("inputs lack 'target_years' (rebuild them with `neurohybrid inputs`)", subject=inputs.subject)
        if subj.suvr.shape[0] < 2:
            raise InputError("the model needs at least 2 observed visits", subject=inputs.subject)
        return subj

    def _pairs(self, pairs) -> list[Subject]:
        if not pairs:
            raise InputError("no training subjects")
        subjects = [Subject.from_inputs(i, t) for i, t in pairs]
        regions = common_regions(subjects)
        return [s.subset(regions) for s in subjects]

    def _seed(self):
        torch.manual_seed(self.s.seed)

    def _correction(self, vocab, mode="excess") -> RegionCorrection:
        self._seed()
        return RegionCorrection(vocab, hidden=self.s.hidden, embedding_dim=self.s.embedding_dim, mode=mode,
                                rate=self.s.correction_rate).to(device=self.device, dtype=self.s.torch_dtype)

    def _output(self, pred_last: torch.Tensor) -> dict:
        return {"suvr": pred_last.detach().cpu().numpy().astype(np.float64).ravel()}


VAL_REFIT_STEPS = 2  # Adam steps per epoch on a validation subject's theta (warm-started)


def _last_members(subjects: list[Subject]) -> torch.Tensor:
    """(M,) bool: the member of ``make_batch(subjects)`` that predicts each subject's last visit."""
    flags = []
    for s in subjects:
        k = s.suvr.shape[0] - 1
        flags += [False] * (k - 1) + [True]
    return torch.as_tensor(flags)


def _ridge(net: RegionCorrection, batch) -> torch.Tensor:
    return net.rate_ridge(Context(batch.base, batch.cov, batch.rid))


def _table(rows: torch.Tensor, idx, n: int) -> torch.Tensor:
    """A parameter table of n rows holding ``rows`` at ``idx`` (others: 1, unused)."""
    return rows.new_ones(n, rows.shape[1]).index_copy(0, torch.as_tensor(list(idx), device=rows.device), rows)


# ------------------------------------------------------------------------------------------
# baselines


class Persistence(_ADFamily):
    name = "persistence"

    def forecast(self, inputs, trained):
        start = time.perf_counter()
        out = np.asarray(inputs.arrays["suvr"], float)[-1].copy()
        return Forecast({"suvr": out}, {}, 0.0, time.perf_counter() - start)


class Mechanistic(_ADFamily):
    name = "mechanistic"

    def forecast(self, inputs, trained):
        subj = self._subject(inputs)
        start = time.perf_counter()
        res = fit_subjects([subj], self.s, self.device, shared=inputs.shared)[0]
        std = laplace_sd(res.theta, subj, self.s)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        pred, _, _ = forecast(res.theta, subj, self.s, self.device)
        return Forecast(self._output(pred), theta_dict(res.theta, std), fit_s, time.perf_counter() - start,
                        {"calibration_loss": res.loss, "restart_losses": [float(loss) for _, loss in res.restarts]})


# ------------------------------------------------------------------------------------------
# data-driven: graph neural ODE


class DataDriven(_ADFamily):
    name = "data_driven"
    trains_across_subjects = True

    def _rollout(self, net, batch):
        dyn = HybridDynamics(None, net).set_context(Context(batch.base, batch.cov, batch.rid), batch.lap)
        return integrate(dyn, batch.first, batch.times, method="rk4", step_size=self.s.dt, t0=batch.times[:, 0],
                         adjoint=self.s.adjoint)

    def train(self, pairs):
        subjects = self._pairs(pairs)
        vocab = subjects[0].regions
        # every observed visit starts a member that predicts the next visit of its subject
        batch = make_batch(subjects, self.s, self.device, vocab=vocab)
        net = self._correction(vocab, mode="free")
        n = len(subjects)

        def loss_fn(idx):
            sub = batch.of_owners(idx)
            return owner_misfit(self._rollout(net, sub), sub, n)[list(idx)].mean()

        res = train_loop(net, loss_fn, n, **self.s.train_kw())
        return {**correction_state(net), "history": res.history, "val_history": res.val_history,
                "best_epoch": res.best_epoch, "validation_subjects": [subjects[i].subject for i in res.val_indices]}

    def forecast(self, inputs, trained):
        subj = self._subject(inputs)
        start = time.perf_counter()
        net = load_correction(trained, self.device, self.s.torch_dtype)
        batch = make_batch([subj], self.s, self.device, forecast_times=[subj.target_years], vocab=net.vocab)
        with torch.no_grad():
            pred = self._rollout(net, batch)
        return Forecast(self._output(pred[0, -1]), {}, 0.0, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------
# parallel hybrids: APHYNITY residual and UDE


class Residual(_ADFamily):
    name = "residual"
    trains_across_subjects = True

    def penalty(self) -> float:
        return self.s.residual_penalty

    def train(self, pairs):
        subjects = self._pairs(pairs)
        vocab = subjects[0].regions
        n = len(subjects)
        batch = make_batch(subjects, self.s, self.device, vocab=vocab)
        bounds = self.s.bounds()
        # validation subjects (the split train_loop will make) are treated as test subjects: theta
        # fitted on their earlier visits with the current correction frozen, scored on their last
        # interval (the forecast task)
        _, val_idx = split_validation(n, self.s.val_fraction, self.s.seed)
        last = _last_members(subjects)
        # theta of each training subject starts at its mechanistic calibration, then moves jointly with g
        fits = fit_subjects([s.visits(s.suvr.shape[0] - 1) if i in val_idx else s for i, s in enumerate(subjects)],
                            self.s, self.device, shared=shared_work(pairs))
        z = torch.tensor(np.stack([bounds.to_unconstrained(r.theta) for r in fits]), dtype=batch.obs.dtype,
                         device=self.device, requires_grad=True)
        z_val = z.detach().clone().requires_grad_(True)
        opt_val = torch.optim.Adam([z_val], lr=self.s.fit_learning_rate)
        val_early = batch.select(~last & torch.isin(batch.owner, torch.as_tensor(val_idx, dtype=torch.long)))
        val_last = batch.select(last)
        net = self._correction(vocab)
        lam = self.penalty()

        def val_loss(idx):
            with torch.enable_grad():
                for _ in range(VAL_REFIT_STEPS):
                    pred, _ = predict(bounds.to_natural(z_val), val_early, self.s, net)
                    (grad,) = torch.autograd.grad(owner_misfit(pred, val_early, n)[list(idx)].sum(), [z_val])
                    z_val.grad = grad
                    opt_val.step()
            pred, _ = predict(bounds.to_natural(z_val), val_last, self.s, net)
            return owner_misfit(pred, val_last, n)[list(idx)].mean()

        def loss_fn(idx):
            if val_idx and set(idx) <= set(val_idx):
                return val_loss(idx)
            sub = batch.of_owners(idx)
            pred, pen = predict(bounds.to_natural(z), sub, self.s, net)
            return owner_misfit(pred, sub, n, pen, lam)[list(idx)].mean() + self.s.rate_penalty * _ridge(net, sub)

        res = train_loop([{"params": [z], "lr": self.s.theta_learning_rate},
                          {"params": list(net.parameters()), "lr": self.s.learning_rate}],
                         loss_fn, n, **self.s.train_kw())
        with torch.no_grad():
            theta = bounds.to_natural(z).cpu().numpy()
        return {**correction_state(net), "penalty": lam, "history": res.history, "val_history": res.val_history,
                "best_epoch": res.best_epoch, "validation_subjects": [subjects[i].subject for i in res.val_indices],
                "train_theta": {s.subject: theta_dict(t) for i, (s, t) in enumerate(zip(subjects, theta))
                                if i not in val_idx}}

    def forecast(self, inputs, trained):
        subj = self._subject(inputs)
        start = time.perf_counter()
        net = load_correction(trained, self.device, self.s.torch_dtype)
        res = fit_subjects([subj], self.s, self.device, correction=net)[0]
        std = laplace_sd(res.theta, subj, self.s, correction=net)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        pred, mech, pen = forecast(res.theta, subj, self.s, self.device, net)
        extra = {"calibration_loss": res.loss, "correction_penalty": pen,
                 # how much the forecast owes to the correction
                 "correction_effect_rmse": float(torch.sqrt(((pred - mech) ** 2).mean()))}
        return Forecast(self._output(pred), theta_dict(res.theta, std), fit_s, time.perf_counter() - start, extra)


class UDE(Residual):
    name = "ude"

    def penalty(self) -> float:
        return 0.0


# ------------------------------------------------------------------------------------------
# series: amortised inference (and parallel-series: amortised + residual)


def _features(subjects: list[Subject], settings, device, dtype):
    return torch.as_tensor(np.stack([s.features(settings) for s in subjects]), dtype=dtype, device=device)


class Amortised(_ADFamily):
    name = "amortised"
    trains_across_subjects = True
    with_correction = False

    def train(self, pairs):
        subjects = self._pairs(pairs)
        vocab = subjects[0].regions
        n = len(subjects)
        # features come from the visits a test subject would have: every visit but the last
        observed = [s.visits(s.suvr.shape[0] - 1) for s in subjects]
        feats = _features(observed, self.s, self.device, self.s.torch_dtype)
        batch = make_batch(subjects, self.s, self.device, vocab=vocab)
        self._seed()
        net = ParameterNet(N_FEATURES, self.s.bounds(), hidden=self.s.hidden).to(device=self.device, dtype=self.s.torch_dtype)
        corr = self._correction(vocab) if self.with_correction else None
        lam = self.s.residual_penalty

        def misfit_of(theta, idx):
            sub = batch.of_owners(idx)
            pred, pen = predict(_table(theta, idx, n), sub, self.s, corr)
            loss = owner_misfit(pred, sub, n, pen, lam)[list(idx)].mean()
            return loss if corr is None else loss + self.s.rate_penalty * _ridge(corr, sub)

        if self.s.amortised_training == "calibrated" and not self.with_correction:
            targets = torch.as_tensor(np.stack([r.theta for r in fit_subjects(observed, self.s, self.device, shared=shared_work(pairs))]),
                                      dtype=feats.dtype, device=self.device)
            res = train_supervised(net, feats, targets, **self.s.train_kw())
        elif corr is None:
            res = train_end_to_end(net, feats, misfit_of, **self.s.train_kw())
        else:
            net.fit_scaler(feats)
            res = train_loop(list(net.parameters()) + list(corr.parameters()),
                             lambda idx: misfit_of(net(feats[list(idx)]), idx), n, **self.s.train_kw())
        out = {"net": net.state(), "history": res.history, "val_history": res.val_history, "best_epoch": res.best_epoch,
               "validation_subjects": [subjects[i].subject for i in res.val_indices],
               "training": "end_to_end" if self.with_correction else self.s.amortised_training}
        if corr is not None:
            out.update({**correction_state(corr), "penalty": lam})
        return out

    def forecast(self, inputs, trained):
        subj = self._subject(inputs)
        start = time.perf_counter()
        net = ParameterNet.from_state(trained["net"]).to(device=self.device, dtype=self.s.torch_dtype)
        corr = load_correction(trained, self.device, self.s.torch_dtype) if self.with_correction else None
        with torch.no_grad():
            theta = net(_features([subj], self.s, self.device, self.s.torch_dtype))
            batch = make_batch([subj], self.s, self.device, vocab=getattr(corr, "vocab", None))
            fit_pred, _ = predict(theta, batch, self.s, corr)
            fit_err = float(owner_misfit(fit_pred, batch, 1)[0])
        pred, _, _ = forecast(theta[0], subj, self.s, self.device, corr)
        seconds = time.perf_counter() - start
        # no per-subject optimisation: inference is the fit
        return Forecast(self._output(pred), theta_dict(theta[0].cpu().numpy()), 0.0, seconds,
                        {"observed_visit_mse": fit_err})


class AmortisedResidual(Amortised):
    name = "amortised_residual"
    with_correction = True


# ------------------------------------------------------------------------------------------
# series: solver-in-the-loop


def spectral_laplacian(lap: torch.Tensor) -> torch.Tensor:
    """(M, N, N) symmetric Laplacians -> (M, N, N+1): the eigenvalues (column 0, eigenvalue j in
    row j) beside the eigenvectors V (columns 1..N, row i = region i), computed once per subject in
    float64. L x = V diag(lam) V^T x and (I + s L)^-1 x = V diag(1 / (1 + s lam)) V^T x for any s
    (kappa h) then cost two (N, N) products, differentiably in kappa (no factorisation per
    calibration step). The SOL model carries it in its covariate channels (``SPECTRAL``), so that
    the core's batching, which repeats and selects covariates per member, keeps it aligned."""
    lam, vec = torch.linalg.eigh(lap.to(torch.float64))
    return torch.cat([lam.clamp_min(0.0)[..., None], vec], dim=-1).to(lap.dtype)


def _spectral_apply(cov: torch.Tensor, x: torch.Tensor, scale) -> torch.Tensor:
    """V diag(scale(lam)) V^T x for x (B, N), the spectral Laplacian in cov (B or 1, N, SPECTRAL + N+1)."""
    lam, vec = cov[..., SPECTRAL], cov[..., SPECTRAL + 1:]
    coef = torch.matmul(x[:, None, :], vec).squeeze(1)  # (V^T x)^T
    return torch.matmul(vec, (scale(lam) * coef)[..., None]).squeeze(-1)


def spectral_transport(cov, x):
    """L x from the spectral Laplacian in the covariates."""
    return _spectral_apply(cov, x, lambda lam: lam)


# covariate channels of the SOL model (per member and region): the parameters, the step, the
# baseline, the invariant range, then the spectral Laplacian (``spectral_laplacian``)
KAPPA, ALPHA, STEP, BASE, AMP, LOWER, UPPER, SPECTRAL = range(8)


def logistic_flow(e, alpha, amp, h):
    """The exact flow over h of de/dt = alpha e (1 - e / A) on e > 0 (unchanged where e <= 0, as
    the model's relu(e) growth): A e / (e + (A - e) exp(-alpha h)); keeps e in [0, A] and brings
    an excess above A down towards it."""
    ep = torch.relu(e)
    grown = amp * ep / (ep + (amp - ep) * torch.exp(-alpha * h))
    return torch.where(e > 0, grown, e)


def _imex_step():
    """The coarse step: Lie splitting of the local network FKPP, the growth integrated exactly
    (``logistic_flow``), then the transport by backward Euler, e <- (I + h kappa L)^-1 e
    (``spectral_laplacian`` in the covariates). Both parts are unconditionally
    stable and keep the excess in its invariant range (the resolvent of the M-matrix
    I + h kappa L is non-negative with unit row sums), so the step may be far beyond forward
    Euler's limit h < 2 / (kappa rho(L) + alpha); the price is a first-order splitting and
    transport error, which the correction learns."""
    def step(u, cov):
        kappa, alpha, h, base, amp = (cov[:, 0:1, KAPPA], cov[:, 0:1, ALPHA], cov[:, 0:1, STEP], cov[..., BASE],
                                      cov[:, 0:1, AMP])
        e = logistic_flow(u - base, alpha, amp, h)
        s = (kappa * h)[:, :, None]  # (B, 1, 1) against lam (B or 1, 1, N)
        e = _spectral_apply(cov, e, lambda lam: 1.0 / (1.0 + s[:, 0] * lam))
        return base + e
    return step


class SplittingCorrection(torch.nn.Module):
    """The SOL correction of the coarse state, in SUVR, per region:

        A (a C + b E + 0.01 (h / H)^2 c),   (a, b, c) = MLP(features)

    with C and E the two leading local error terms of the coarse step (below, both O(h^2)
    already): the network learns their coefficients as functions of the state and the step
    (backward Euler's leading error is +s^2 L^2 x / 2, so b -> -1/2 for s rho -> 0; one least-squares
    pair (a, b) over fine one-step errors of the prior's draws is (0.46, -0.72) and explains 68% of
    their RMS), and a free remainder c scaled to a coarse step's error (1e-4-1e-2 A).
    One MLP shared by all regions (it sees neighbours through the Laplacian). Features, all
    dimensionless, from x = (u - b) / A (the excess as a fraction of the amplitude), the transport
    number s = h kappa and the growth number r = h alpha:

    * x, L x, and kappa, alpha, A log-scaled to [0, 1] by the ranges the network is trained on
      (``sol_bounds``), h / H (H = ``sol_coarse_dt``, the training step);
    * s r (L g(x) - g'(x) L x), g(x) = x (1 - x): the commutator of growth and transport, the
      leading error term of the Lie splitting;
    * s^2 L^2 x / (1 + s rho): backward Euler's leading transport error, damped where the step is
      far beyond its accuracy (rho: the largest Laplacian eigenvalue);
    * s L x and r g(x): the sizes of the two sub-steps.

    The correction is O(h^2) as the step shrinks (the splitting's and backward Euler's local
    errors), so it vanishes there (a forecast a moment ahead is the observed state). (An earlier
    A (h / H)^2 MLP(features) made the error terms O(h^4) and its output scale, O(A), 100 times a
    step's error: SOL-4 training diverged in its first epoch and the fall-back switched it off.)
    The CorrectedSolver gates it by 4 x (1 - x) (exactly zero where there is no excess, and at the capacity) and clamps the state
    to the model's invariant range."""

    N_FEATURES = 10
    FREE_SCALE = 0.01  # the free term's output scale (fraction of A): a coarse step's error is ~1e-4-1e-2 A

    def __init__(self, bounds, coarse_dt: float, hidden: int = 16):
        super().__init__()
        lo = torch.log(torch.as_tensor(np.asarray(bounds.lower, dtype=np.float64)))
        hi = torch.log(torch.as_tensor(np.asarray(bounds.upper, dtype=np.float64)))
        self.register_buffer("log_lo", lo)
        self.register_buffer("log_width", hi - lo)
        self.register_buffer("coarse_dt", torch.tensor(float(coarse_dt)))
        last = torch.nn.Linear(hidden, 3)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(torch.nn.Linear(self.N_FEATURES, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), last)

    def features(self, u, cov):
        amp = cov[..., AMP].expand_as(u)
        x = (u - cov[..., BASE]) / amp
        theta = torch.stack([cov[..., KAPPA], cov[..., ALPHA], cov[..., AMP]], dim=-1)
        p = (torch.log(theta) - self.log_lo.to(u.dtype)) / self.log_width.to(u.dtype)
        hn = (cov[..., STEP] / self.coarse_dt.to(u.dtype)).expand_as(u)
        s = (cov[..., KAPPA] * cov[..., STEP]).expand_as(u)
        r = (cov[..., ALPHA] * cov[..., STEP]).expand_as(u)
        lam, vec = cov[..., SPECTRAL], cov[..., SPECTRAL + 1:]
        rho = lam.amax(dim=-1, keepdim=True)
        g = x * (1.0 - x)
        # L x, L^2 x and L g in the eigenbasis: two products for the three
        coef = torch.matmul(torch.stack([x, g], dim=1), vec)  # (B, 2, N): V^T x, V^T g
        back = torch.matmul(torch.stack([lam * coef[:, 0], lam * lam * coef[:, 0], lam * coef[:, 1]], dim=1),
                            vec.transpose(-1, -2))
        lx, llx, lg = back[:, 0], back[:, 1], back[:, 2]
        comm = s * r * (lg - (1.0 - 2.0 * x) * lx)
        be = s * s * llx / (1.0 + s * rho)
        return torch.cat([torch.stack([x, lx, comm, be, s * lx, r * g, hn], dim=-1), p.expand(*u.shape, 3)], dim=-1)

    def forward(self, u, covariates=None, lap=None):
        feats = self.features(u, covariates)
        out = self.net(feats)
        hn = covariates[..., STEP] / self.coarse_dt.to(u.dtype)
        # learned coefficients of the two leading error terms (already O(h^2)) plus a free
        # remainder O((h / H)^2), scaled to the size of a coarse step's error
        free = self.FREE_SCALE * hn ** 2 * out[..., 2]
        return covariates[..., AMP] * (out[..., 0] * feats[..., 2] + out[..., 1] * feats[..., 3] + free)


def _excess_gate(u, cov):
    """4 x (1 - x), x = (u - b) / A, clamped at 0: zero where the region has no excess over its
    baseline (or is at or above its capacity)."""
    return logistic_gate(u, cov[..., BASE], cov[..., BASE] + cov[..., AMP])


def _invariant_range(u, cov):
    """(lower, upper) per region: b + min(0, min_j e0_j) and b + max(A, max_j e0_j), e0 the excess
    of the rollout's start state. The model keeps its state there (transport is an averaging and
    the growth pushes e towards [0, A]), so only what the model itself cannot reach is clamped:
    an observed start state may read below its baseline (measurement noise; the model lets such a
    region be filled by transport, it is neither a seed nor a sink) or above its capacity."""
    return cov[..., LOWER], cov[..., UPPER]


def _sol_model(settings: Settings, device, dtype, state=None) -> CorrectedSolver:
    net = SplittingCorrection(settings.sol_bounds(), settings.sol_coarse_dt, hidden=settings.hidden)
    if state is not None:
        net.load_state_dict(state)
    return CorrectedSolver(_imex_step(), net.to(device=device, dtype=dtype), state_range=_invariant_range,
                           gate=_excess_gate)


def _sol_covariates(theta, h, base, first, spectral):
    """(M, N, 8 + N): kappa, alpha, step, regional baseline, amplitude, invariant range (lower,
    upper) of the member's start state ``first``, spectral Laplacian."""
    bsz, n = base.shape
    amp = theta[:, 2:3]
    excess = (first - base).detach()
    lower = base + torch.clamp(excess.amin(dim=-1, keepdim=True), max=0.0)
    upper = base + torch.maximum(amp, excess.amax(dim=-1, keepdim=True))
    own = torch.stack([theta[:, 0:1].expand(bsz, n), theta[:, 1:2].expand(bsz, n), h[:, None].expand(bsz, n), base,
                       amp.expand(bsz, n), lower, upper], dim=-1)
    return torch.cat([own, spectral.to(own.dtype).expand(bsz, *spectral.shape[1:])], dim=-1)


def _spectral_of(batch):
    """``spectral_laplacian`` of the batch's Laplacians, computed once per batch."""
    spec = getattr(batch, "_spectral", None)
    if spec is None:
        spec = spectral_laplacian(batch.lap)
        batch._spectral = spec
    return spec


def sol_rollout(model: CorrectedSolver, theta_rows, batch, settings: Settings, coarse_dt=None, corrected=True):
    """States at batch.times from the corrected (or plain) coarse solver, each member from its
    observed start state: each visit interval is cut into n = ceil(gap / coarse_dt) equal steps
    (one step per visit interval at the default step; the scheme is stable at any step)."""
    coarse_dt = settings.sol_coarse_dt if coarse_dt is None else coarse_dt
    theta = theta_rows[batch.owner]
    u = batch.first
    spectral = _spectral_of(batch)
    model.set_context(None, None)
    states = []
    prev = batch.times[:, 0]
    for k in range(batch.times.shape[1]):
        gap = batch.times[:, k] - prev
        longest = float(gap.max())
        if longest > 0:
            n = max(1, math.ceil(longest / coarse_dt - 1e-9))
            cov = _sol_covariates(theta, gap / n, batch.base, batch.first, spectral)
            model.covariates = cov
            for _ in range(n):
                u = model.step(u) if corrected else model.coarse_step(u, cov)
        states.append(u)
        prev = batch.times[:, k]
    return torch.stack(states, dim=1)


def fine_dt(theta, batch) -> float:
    """The fine solver's step: ``default_rk4_dt`` (h * Jacobian bound <= 0.05) for every member."""
    from neurohybrid.solvers.network import default_rk4_dt

    th = theta.detach().cpu().double().numpy()
    th = th[batch.owner.cpu().numpy()] if th.shape[0] != batch.size else th
    base = batch.base.cpu().double().numpy()
    return min(default_rk4_dt(batch.lap[i].cpu().double().numpy(), th[i, 0], th[i, 1] / th[i, 2], base[i],
                              base[i] + th[i, 2]) for i in range(batch.size))


def fine_rollout(theta_rows, batch, settings, dt=None):
    """The fine (reference) solver: classical RK4 of the model (``predict``, relu growth, any start
    state) with the accurate step ``fine_dt`` (the Numba solver's default RK4 step)."""
    dt = fine_dt(theta_rows, batch) if dt is None else dt
    pred, _ = predict(theta_rows, batch, dataclasses.replace(settings, dt=dt, adjoint=False))
    return pred


SOL_ERROR_METRIC = ("RMSE over regions (SUVR) at the forecast visit between the coarse solver (with or without "
                    "the learned correction) and the fine solver (RK4, h * Jacobian bound <= 0.05), both from the "
                    "observed last visit at the subject's fitted parameters")


def sol_accuracy_and_cost(model: CorrectedSolver, theta, batch, settings: Settings, repeats: int = 2) -> dict:
    """Error of the corrected and of the plain coarse solver against the fine solver at the last
    time of ``batch`` (RMSE over regions, mean over members) and best-of-``repeats`` wall times of
    the three solvers (same threads)."""
    saved = model.use_correction
    with torch.no_grad():
        dt = fine_dt(theta, batch)
        fine = fine_rollout(theta, batch, settings, dt)[:, -1]

        def err(x):
            return float(torch.sqrt(((x[:, -1] - fine) ** 2).mean(dim=-1)).mean())

        sol = sol_rollout(model, theta, batch, settings)
        coarse = sol_rollout(model, theta, batch, settings, corrected=False)
        out = {"sol_error_vs_fine": err(sol), "coarse_error_vs_fine": err(coarse),
               "fine_cost_seconds": time_call(lambda: fine_rollout(theta, batch, settings, dt), repeats),
               "coarse_cost_seconds": time_call(lambda: sol_rollout(model, theta, batch, settings, corrected=False),
                                                repeats),
               "sol_cost_seconds": time_call(lambda: sol_rollout(model, theta, batch, settings), repeats),
               "use_correction": bool(saved), "sol_error_metric": SOL_ERROR_METRIC, "fine_dt_years": dt,
               "coarse_dt_years": settings.sol_coarse_dt}
    model.use_correction = saved
    return out


def sol_training_set(subjects: list[Subject], settings: Settings, seed: int, device, dtype):
    """Fine-solver trajectories for the SOL training: from every observed visit of the training
    subjects (raised to the baseline where noise reads below it), ``sol_samples`` draws of
    (kappa, alpha, A) log-uniform in ``sol_bounds`` and of the step h in [0.4, 1] ``sol_coarse_dt``
    (the steps ``sol_rollout`` takes), K = max(sol_trajectory_steps, sol_steps) steps of h each, so
    every trajectory spans several forecast horizons (a visit interval is one step). The fine
    solver is the Numba RK4 (``simulate_network``, default accurate step).

    Returns (fine (B, K+1, N), covariates (B, N, 8 + N) as ``_sol_covariates``)."""
    from neurohybrid.solvers.network import simulate_network

    rng = np.random.default_rng(seed)
    bounds = settings.sol_bounds()
    k_steps = max(settings.sol_trajectory_steps, settings.sol_steps)
    fines, covs = [], []
    for s in subjects:
        base = s.baseline(settings)
        starts = np.repeat(np.maximum(s.suvr, base), settings.sol_samples, axis=0)
        m = starts.shape[0]
        theta = bounds.sample(m, rng)
        amp = np.maximum(theta[:, 2], 1.05 * (starts - base).max(axis=1))  # starts at or below the capacity
        h = settings.sol_coarse_dt * rng.uniform(0.4, 1.0, m)
        # K steps of size h == K unit steps of the model with rates scaled by h; the solver's
        # local model alpha' (u - b)(c - u) is ours with alpha' = alpha / A, c = b + A (e >= 0 here)
        traj = simulate_network(s.lap, starts, np.arange(1, k_steps + 1, dtype=float), kappa=theta[:, 0] * h,
                                alpha=theta[:, 1] / amp * h, model="local", baseline=np.broadcast_to(base, starts.shape),
                                capacity=base[None, :] + amp[:, None], method="rk4", threads=1)
        fines.append(np.concatenate([starts[:, None], traj], axis=1))
        bshape = starts.shape
        covs.append(np.stack([np.broadcast_to(theta[:, 0:1], bshape), np.broadcast_to(theta[:, 1:2], bshape),
                              np.broadcast_to(h[:, None], bshape), np.broadcast_to(base, bshape),
                              np.broadcast_to(amp[:, None], bshape), np.broadcast_to(base, bshape),
                              base[None, :] + amp[:, None]], axis=-1))
        spec = spectral_laplacian(torch.as_tensor(s.lap[None], dtype=torch.float64))[0].numpy()
        covs[-1] = np.concatenate([covs[-1], np.broadcast_to(spec, (m,) + spec.shape)], axis=-1)
    return (torch.as_tensor(np.concatenate(fines), dtype=dtype, device=device),
            torch.as_tensor(np.concatenate(covs), dtype=dtype, device=device))


SOL_ERROR_FLOOR = 1e-4  # SUVR: coarse errors below a hundredth of the bench's tolerance count as this


def sol_loss_weights(model: CorrectedSolver, fine, cov, power: float):
    """Relative loss weights (B,) of the training trajectories: (e^2 + floor^2)^(-power / 2), e the
    RMS error of the plain coarse step from each fine state of the trajectory (``SOL_ERROR_FLOOR``),
    normalised to mean 1; None for power 0 (the plain mean squared error). The coarse one-step
    error spans four orders of magnitude over the prior (kappa h from 0.004 to 1.5): without
    weights the few stiffest draws set the loss and the correction overshoots on the mild ones."""
    if not power:
        return None
    inputs, targets = precomputed_pairs(model, fine, cov)
    err2 = ((inputs - targets) ** 2).reshape(fine.shape[0], -1).mean(dim=1)
    w = (err2 + SOL_ERROR_FLOOR ** 2) ** (-0.5 * float(power))
    return w / w.mean()


class SolverInTheLoop(_ADFamily):
    """Solver-in-the-loop (Um et al. 2020) as an accelerated mechanistic model: the coarse step is
    one semi-implicit step per visit interval (``_imex_step``; ``sol_coarse_dt`` years, beyond
    forward Euler's limit for the stiff part of the prior), corrected by ``SplittingCorrection``
    trained (``fit_correction``) by unrolling ``sol_steps`` coarse steps against fine trajectories
    (``sol_training_set``); the correction is switched off (recorded) when it does not beat the
    plain coarse solver on held-out draws. The corrected solver is the forward model of the
    subject's calibration (within ``sol_bounds``, where the network was trained)."""

    name = "sol"
    trains_across_subjects = True
    precomputed = False

    def train(self, pairs):
        subjects = self._pairs(pairs)
        dtype = self.s.torch_dtype
        fine, cov = sol_training_set(subjects, self.s, self.s.seed, self.device, dtype)
        self._seed()
        model = _sol_model(self.s, self.device, dtype)
        model.set_context(cov)
        kw = dict(self.s.train_kw(), batch_size=self.s.sol_batch_size)
        weights = sol_loss_weights(model, fine, cov, self.s.sol_weight_power)
        ck = fit_correction(model, fine, cov, precomputed=self.precomputed, n_unroll=self.s.sol_steps, weights=weights,
                            **kw)
        ck["correction"] = {k: v.detach().cpu() for k, v in ck.pop("state_dict").items()}
        ck.update({"hidden": self.s.hidden, "n_trajectories": int(fine.shape[0]),
                   "coarse_dt_years": self.s.sol_coarse_dt})
        return ck

    def model(self, trained) -> CorrectedSolver:
        model = _sol_model(self.s, self.device, self.s.torch_dtype, trained["correction"])
        model.use_correction = bool(trained.get("use_correction", True))
        for p in model.correction.parameters():
            p.requires_grad_(False)
        return model

    def forecast(self, inputs, trained):
        from neurohybrid.hybrid.calibration import calibrate_gradient_many

        subj = self._subject(inputs)
        start = time.perf_counter()
        model = self.model(trained)
        r = max(1, self.s.restarts)
        rep = make_batch([subj], self.s, self.device, repeats=r)

        def loss_fn(theta):
            return owner_misfit(sol_rollout(model, theta.to(rep.obs.dtype), rep, self.s), rep, r)

        sb = self.s.sol_bounds()
        init = np.clip(subj.theta_init(self.s), sb.lower * 1.01, sb.upper * 0.99)
        res = calibrate_gradient_many(loss_fn, sb, 1, init=[init], n_restarts=r,
                                      steps=self.s.fit_iterations, lr=self.s.fit_learning_rate,
                                      lbfgs_steps=self.s.lbfgs_iterations, seed=self.s.seed, dtype=rep.obs.dtype,
                                      device=self.device, tol=1e-7)[0]
        fit_s = time.perf_counter() - start
        theta = torch.as_tensor(res.theta[None], dtype=rep.obs.dtype, device=self.device)
        batch = make_batch([subj], self.s, self.device, forecast_times=[subj.target_years])
        start = time.perf_counter()
        with torch.no_grad():
            pred = sol_rollout(model, theta, batch, self.s)
        infer_s = time.perf_counter() - start
        extra = {"calibration_loss": res.loss, **sol_accuracy_and_cost(model, theta, batch, self.s)}
        return Forecast(self._output(pred[0, -1]), theta_dict(res.theta), fit_s, infer_s, extra)


class SolverPrecomputed(SolverInTheLoop):
    """The same network and training data, trained on pre-computed one-step targets."""

    name = "sol_precomputed"
    precomputed = True


FAMILY_CLASSES = {
    cls.name: cls for cls in (Persistence, Mechanistic, DataDriven, Residual, UDE, SolverInTheLoop, SolverPrecomputed,
                              Amortised, AmortisedResidual)
}
