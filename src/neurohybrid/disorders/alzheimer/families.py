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
sol                  solver-in-the-loop: a forward-Euler step of size ``sol_coarse_dt`` corrected
                     by a network, trained by unrolling ``sol_steps`` steps against the fine RK4
                     solver; used as the forward model of the subject's calibration.
sol_precomputed      the same network trained on pre-computed one-step targets.
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
from neurohybrid.hybrid.neural_ode import HybridDynamics, RegionwiseMLP, integrate, transport
from neurohybrid.hybrid.solver_in_loop import CorrectedSolver, time_call, train_precomputed, train_sol
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


def _euler_step(model_ref):
    """Forward Euler of the local network FKPP with per-member (kappa, alpha, h, baseline,
    amplitude) read from the covariate channels; the Laplacian from the CorrectedSolver's context."""
    def step(u, cov):
        kappa, alpha, h, base, amp = cov[:, 0:1, 0], cov[:, 0:1, 1], cov[:, 0:1, 2], cov[..., 3], cov[:, 0:1, 4]
        excess = u - base
        e = torch.relu(excess)
        du = -kappa * transport(excess, model_ref[0].lap) + alpha * e * (1.0 - e / amp)
        return u + h * du
    return step


class StepScaledCorrection(torch.nn.Module):
    """h^2 * MLP(u, Lu, kappa, alpha, h, b, A): forward Euler's local error is O(h^2), so the
    network learns the O(1) coefficient instead of a quantity that shrinks with the step."""

    def __init__(self, net: RegionwiseMLP):
        super().__init__()
        self.net = net

    def forward(self, u, covariates=None, lap=None):
        return covariates[..., 2] ** 2 * self.net(u, covariates, lap)


SOL_COVARIATES = 5


def _sol_model(settings: Settings, device, dtype, state=None) -> CorrectedSolver:
    ref: list = [None]
    net = StepScaledCorrection(RegionwiseMLP(n_covariates=SOL_COVARIATES, hidden=settings.hidden, use_transport=True,
                                             zero_init=True))
    if state is not None:
        net.load_state_dict(state)
    model = CorrectedSolver(_euler_step(ref), net.to(device=device, dtype=dtype))
    ref[0] = model
    return model


def _sol_covariates(theta, h, base):
    """(M, N, 5): kappa, alpha, step, regional baseline, amplitude."""
    bsz, n = base.shape
    return torch.stack([theta[:, 0:1].expand(bsz, n), theta[:, 1:2].expand(bsz, n), h[:, None].expand(bsz, n), base,
                        theta[:, 2:3].expand(bsz, n)], dim=-1)


EULER_STABILITY = 1.0  # h * (Jacobian bound) at most this: forward Euler stays well inside |1 - h lambda| < 1


def jacobian_bound(kappa, alpha, lap_diag_max, growth_factor=1.0):
    """Upper bound of the local FKPP Jacobian's spectral radius (Gershgorin: rho(L) <= 2 max L_ii;
    the growth's derivative alpha (1 - 2 e / A) is at most alpha * growth_factor in size,
    growth_factor = max(1, 2 e_max / A - 1))."""
    return kappa * 2.0 * lap_diag_max + alpha * growth_factor


def _growth_factor(u, base, amp):
    return torch.clamp(2.0 * torch.relu(u - base).amax(dim=-1) / amp - 1.0, min=1.0)


def sol_rollout(model: CorrectedSolver, theta_rows, batch, settings: Settings, coarse_dt=None, corrected=True):
    """States at batch.times from the corrected (or plain) coarse solver, each member from its
    observed start state: each visit interval is cut into n equal steps, n = ceil(gap / coarse_dt),
    more where a step would leave Euler's stability margin (the same rule that bounds the training
    steps)."""
    coarse_dt = settings.sol_coarse_dt if coarse_dt is None else coarse_dt
    theta = theta_rows[batch.owner]
    u = batch.first
    model.set_context(None, batch.lap)
    states = []
    prev = batch.times[:, 0]
    for k in range(batch.times.shape[1]):
        gap = batch.times[:, k] - prev
        longest = float(gap.max())
        if longest > 0:
            lam = float(jacobian_bound(theta[:, 0].detach(), theta[:, 1].detach(),
                                       torch.diagonal(batch.lap, dim1=-2, dim2=-1).amax(dim=-1),
                                       _growth_factor(u.detach(), batch.base, theta[:, 2].detach())).max())
            n = max(1, math.ceil(longest / coarse_dt - 1e-9), math.ceil(longest * lam / EULER_STABILITY - 1e-9))
            cov = _sol_covariates(theta, gap / n, batch.base)
            model.covariates = cov
            for _ in range(n):
                u = model.step(u) if corrected else model.coarse_step(u, cov)
        states.append(u)
        prev = batch.times[:, k]
    return torch.stack(states, dim=1)


def _rk4_rollout(theta_rows, batch, settings, dt):
    """The mechanistic model integrated by RK4 with step dt (the same discretisation as the solver)."""
    pred, _ = predict(theta_rows, batch, dataclasses.replace(settings, dt=dt, adjoint=False))
    return pred


class SolverInTheLoop(_ADFamily):
    name = "sol"
    trains_across_subjects = True
    precomputed = False

    def _fine_trajectories(self, subjects: list[Subject]):
        """Fine-solver (Numba RK4, default accurate step) trajectories of K coarse steps from every
        observed state of the training subjects, with sampled (kappa, alpha, amplitude) and step sizes."""
        from neurohybrid.solvers.network import simulate_network

        rng = np.random.default_rng(self.s.seed)
        bounds = self.s.sol_bounds()
        k_steps = max(self.s.sol_trajectory_steps, self.s.sol_steps)
        fines, covs, laps = [], [], []
        for s in subjects:
            base = s.baseline(self.s)
            starts = np.repeat(np.maximum(s.suvr, base), self.s.sol_samples, axis=0)
            m = starts.shape[0]
            theta = bounds.sample(m, rng)
            amp = np.maximum(theta[:, 2], 1.05 * (starts - base).max(axis=1))  # starts at or below the capacity
            h = self.s.sol_coarse_dt * rng.uniform(0.5, 1.0, m)
            lam = jacobian_bound(theta[:, 0], theta[:, 1], np.diag(s.lap).max())
            h = np.minimum(h, EULER_STABILITY / lam)  # as sol_rollout: no step outside Euler's margin
            # K steps of size h == K unit steps of the model with rates scaled by h; the solver's
            # local model alpha' (u - b)(c - u) is ours with alpha' = alpha / A, c = b + A
            traj = simulate_network(s.lap, starts, np.arange(1, k_steps + 1, dtype=float), kappa=theta[:, 0] * h,
                                    alpha=theta[:, 1] / amp * h, model="local", baseline=np.broadcast_to(base, starts.shape),
                                    capacity=base[None, :] + amp[:, None], method="rk4", threads=1)
            fines.append(np.concatenate([starts[:, None], traj], axis=1))
            covs.append(np.stack([np.broadcast_to(theta[:, 0:1], starts.shape), np.broadcast_to(theta[:, 1:2], starts.shape),
                                  np.broadcast_to(h[:, None], starts.shape), np.broadcast_to(base, starts.shape),
                                  np.broadcast_to(amp[:, None], starts.shape)], axis=-1))
            laps.append(np.broadcast_to(s.lap, (m,) + s.lap.shape))
        dt = self.s.torch_dtype
        return (torch.as_tensor(np.concatenate(fines), dtype=dt, device=self.device),
                torch.as_tensor(np.concatenate(covs), dtype=dt, device=self.device),
                torch.as_tensor(np.concatenate(laps), dtype=dt, device=self.device))

    def train(self, pairs):
        subjects = self._pairs(pairs)
        fine, cov, lap = self._fine_trajectories(subjects)
        self._seed()
        model = _sol_model(self.s, self.device, self.s.torch_dtype)
        model.set_context(cov, lap)
        # items are the fine trajectories (mini-batches of batch_size trajectories)
        kw = self.s.train_kw()
        if self.precomputed:
            res = train_precomputed(model, fine, **kw)
        else:
            res = train_sol(model, fine, n_unroll=self.s.sol_steps, **kw)
        return {"correction": {k: v.cpu() for k, v in model.correction.state_dict().items()}, "hidden": self.s.hidden,
                "history": res.history, "val_history": res.val_history,
                "training_target": "precomputed" if self.precomputed else f"sol-{self.s.sol_steps}",
                "n_trajectories": int(fine.shape[0])}

    def forecast(self, inputs, trained):
        from neurohybrid.hybrid.calibration import calibrate_gradient_many

        subj = self._subject(inputs)
        start = time.perf_counter()
        model = _sol_model(self.s, self.device, self.s.torch_dtype, trained["correction"])
        for p in model.correction.parameters():
            p.requires_grad_(False)
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
        extra = {"calibration_loss": res.loss, **self._accuracy_and_cost(model, theta, batch, pred)}
        return Forecast(self._output(pred[0, -1]), theta_dict(res.theta), fit_s, infer_s, extra)

    def _accuracy_and_cost(self, model, theta, batch, pred) -> dict:
        """SOL accuracy against the fine solver at the fitted parameters, and cost at equal accuracy.

        fine: RK4 with the solver's default accurate step (``default_rk4_dt``, the Numba
        discretisation). Errors are RMSE over regions at the forecast visit. The equal-accuracy
        reference is the cheapest of forward Euler and RK4 with coarse_dt / m (m = 1..64) whose
        error is at most SOL's.
        """
        from neurohybrid.solvers.network import default_rk4_dt

        bd = batch
        th = theta.cpu().double().numpy()
        base = bd.base[0].cpu().double().numpy()
        fine_dt = default_rk4_dt(bd.lap[0].cpu().double().numpy(), th[:, 0], th[:, 1] / th[:, 2], base,
                                 base + th[0, 2])
        with torch.no_grad():
            fine = _rk4_rollout(theta, bd, self.s, fine_dt)
            coarse = sol_rollout(model, theta, bd, self.s, corrected=False)

            def err(x):
                return float(torch.sqrt(((x[0, -1] - fine[0, -1]) ** 2).mean()))

            sol_err, coarse_err = err(pred), err(coarse)
            costs = {
                "sol": time_call(lambda: sol_rollout(model, theta, bd, self.s)),
                "coarse": time_call(lambda: sol_rollout(model, theta, bd, self.s, corrected=False)),
                "fine": time_call(lambda: _rk4_rollout(theta, bd, self.s, fine_dt)),
            }
            best = None
            for method in ("euler", "rk4"):
                for m in (1, 2, 4, 8, 16, 32, 64):
                    h = self.s.sol_coarse_dt / m
                    if method == "euler":
                        run = lambda h=h: sol_rollout(model, theta, bd, self.s, coarse_dt=h, corrected=False)  # noqa: E731
                    else:
                        run = lambda h=h: _rk4_rollout(theta, bd, self.s, h)  # noqa: E731
                    if err(run()) <= sol_err:
                        cost = time_call(run, repeats=2)
                        if best is None or cost < best[2]:
                            best = (method, m, cost)
                        break
        out = {"sol_error": sol_err, "coarse_error": coarse_err, "sol_cost_seconds": costs["sol"],
               "coarse_cost_seconds": costs["coarse"], "fine_cost_seconds": costs["fine"], "fine_dt_years": fine_dt,
               "speedup_vs_fine": costs["fine"] / max(costs["sol"], 1e-12)}
        if best is not None:
            out.update({"equal_accuracy_method": best[0], "equal_accuracy_step_years": self.s.sol_coarse_dt / best[1],
                        "equal_accuracy_cost_seconds": best[2],
                        "speedup_equal_accuracy": best[2] / max(costs["sol"], 1e-12)})
        else:
            out.update({"equal_accuracy_method": None, "speedup_equal_accuracy": None})
        return out


class SolverPrecomputed(SolverInTheLoop):
    name = "sol_precomputed"
    precomputed = True


FAMILY_CLASSES = {
    cls.name: cls for cls in (Persistence, Mechanistic, DataDriven, Residual, UDE, SolverInTheLoop, SolverPrecomputed,
                              Amortised, AmortisedResidual)
}
