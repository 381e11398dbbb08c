"""The stroke model families (see ``neurohybrid.disorders.base.FAMILIES``).

The mechanistic core is the per-voxel Xue 2021 model with a per-subject sensitivity sigma
(``stroke.mechanistic``). Hybrids:

* residual (APHYNITY, parallel): the model is driven by CBF / sigma + c_phi(x), c a small 3D CNN of
  (CBF, tissue, acute core): spatial context the per-voxel model lacks (collaterals, penumbra).
  Loss = soft Dice at follow-up + lambda * mean c^2; c = 0 is the mechanistic model.
* ude: dD/dt, dT/dt = Xue(D, T; H) + g_phi(D, T, H), g a pointwise MLP, integrated by torchdiffeq.
* sol / sol_precomputed (series): a large-step (``sol_step_hours``) semi-implicit solver whose state a
  pointwise MLP corrects after each step; SOL-n unrolls n steps against the fine Numba solver
  (RK4, ``fine_dt_s``), the pre-computed variant learns one-step targets. Same network.
* amortised (series): a CNN maps CBF, tissue, core and times to sigma; the solver forecasts.
* amortised_residual (parallel-series): amortised sigma + the residual CBF correction.
* data_driven: a CNN from CBF, tissue, core and times to the final infarct.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from neurohybrid.disorders import voxel
from neurohybrid.disorders.base import Forecast
from neurohybrid.disorders.networks import ParamNet, TinyCNN, soft_dice_loss
from neurohybrid.disorders.stroke import mechanistic as mech
from neurohybrid.disorders.stroke.inputs import cropped_target
from neurohybrid.disorders.voxel_family import (VoxelFamily, check_trained, train_corrected_solver, train_mask_cnn,
                                                train_param_net)
from neurohybrid.errors import InputError

HOURS = 24.0  # time features in days
CBF_SCALE = 60.0


def _rep(m) -> float | None:
    r = m["reperfusion_h"]
    return None if r is None or r >= float(m["hours_followup"]) else float(r)


class StrokeFamily(VoxelFamily):
    settings = staticmethod(mech.settings)

    def calibrate(self, inputs):
        return mech.calibrate(inputs, self.s)


class Persistence(StrokeFamily):
    name = "persistence"

    def forecast(self, inputs, trained):
        t = time.perf_counter()
        core = inputs.arrays["core"].astype(bool)
        return Forecast(dict(infarct=core, dead=core.astype(np.float32)), {}, 0.0, time.perf_counter() - t)


class Mechanistic(StrokeFamily):
    name = "mechanistic"

    def forecast(self, inputs, trained):
        fit = self.calibrate(inputs)
        t = time.perf_counter()
        dead = mech.forecast_dead(inputs, fit, self.s)
        return Forecast(dict(infarct=mech.infarct_from_dead(dead, inputs.arrays["core"]), dead=dead), fit.parameters(),
                        fit.seconds, time.perf_counter() - t,
                        {"uncertainty": "profile interval of sigma (loss within 5% + 0.005 of the minimum, 2% steps)",
                         **fit.diagnostics()})


# ---------------------------------------------------------------------------------------------
# data-driven
# ---------------------------------------------------------------------------------------------

def _image(inputs, box, with_times=True) -> np.ndarray:
    a, m = inputs.arrays, inputs.meta
    chans = [a["cbf"][box] / CBF_SCALE, a["wm"][box], a["gm"][box], a["core"][box].astype(np.float32)]
    if with_times:
        rep = _rep(m)
        follow = float(m["hours_followup"])
        shape = chans[0].shape
        chans += [np.full(shape, follow / HOURS), np.full(shape, (rep if rep is not None else follow) / HOURS),
                  np.full(shape, 1.0 if rep is not None else 0.0)]
    return np.stack(chans).astype(np.float32)


def _box(inputs, s, extra=None):
    masks = [mech.candidates(inputs, s)] + ([extra] if extra is not None else [])
    return voxel.tumour_box(masks, inputs.arrays["cbf"].shape, int(s["train_margin"]))


class DataDriven(StrokeFamily):
    name = "data_driven"
    trains_across_subjects = True

    def net(self):
        return TinyCNN(7, 1, int(self.s["hidden"]), 3, zero_init=True).to(self.device)

    def train(self, pairs):
        items = []
        for inputs, target in pairs:
            tgt = cropped_target(inputs, target)
            box = _box(inputs, self.s, tgt)
            core = inputs.arrays["core"][box].astype(np.float32)
            items.append((self.tensor(_image(inputs, box))[None], self.tensor(3.0 * (2.0 * core - 1.0))[None, None],
                          self.tensor(tgt[box])[None, None]))
        net = self.net()
        history = train_mask_cnn(net, items, self.train_kw())
        return {"state_dict": net.state_dict(), "history": history, "settings": self.s}

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        net = self.net()
        net.load_state_dict(trained["state_dict"])
        t = time.perf_counter()
        full = tuple(slice(0, n) for n in inputs.arrays["cbf"].shape)
        core = inputs.arrays["core"].astype(np.float32)
        with torch.no_grad():
            p = torch.sigmoid(net(self.tensor(_image(inputs, full))[None]) + self.tensor(3.0 * (2.0 * core - 1.0))[None, None])
        p = p[0, 0].cpu().numpy() * ((inputs.arrays["wm"] + inputs.arrays["gm"]) >= float(self.s["tissue_min"]))
        return Forecast(dict(infarct=p > 0.5, dead=p.astype(np.float32)), {}, 0.0, time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# residual (APHYNITY) on the driving flow, and its amortised variant
# ---------------------------------------------------------------------------------------------

class _Case:
    def __init__(self, inputs, fit, s, target=None):
        a, m = inputs.arrays, inputs.meta
        extra = cropped_target(inputs, target) if target is not None else None
        self.box = _box(inputs, s, extra)
        self.cand = mech.candidates(inputs, s)[self.box]
        self.image = _image(inputs, self.box, with_times=False)
        self.cbf = a["cbf"][self.box][self.cand]
        self.wm = np.clip(a["wm"][self.box][self.cand], 0, 1)
        self.core = a["core"][self.box][self.cand]
        self.target = extra[self.box][self.cand] if extra is not None else None
        self.fit = fit
        self.hours = float(m["hours_followup"])
        self.rep = _rep(m)

    def on_grid(self, values, shape) -> np.ndarray:
        """Values on the candidate voxels -> float32 map of the cropped grid (0 elsewhere)."""
        out = np.zeros(shape, np.float32)
        sub = out[self.box]
        sub[self.cand] = values
        out[self.box] = sub
        return out


def residual_dead(net, case: _Case, s, device, voxels=None):
    """D at follow-up on the case's candidate voxels (or on the subset ``voxels`` of them), driven by
    CBF / sigma + c_phi; and mean c^2 over all candidate voxels.

    The correction c is a CNN of the whole image (spatial context); the tissue-death model is per
    voxel, so solving it on a subset gives exactly those voxels' values of the full solve."""
    from neurohybrid.solvers.stroke import normal_cbf, simulate_tissue_death_torch

    img = torch.as_tensor(case.image, device=device)[None]
    cand = torch.as_tensor(case.cand, device=device)
    c_all = net(img)[0, 0][cand]
    pen = (c_all ** 2).mean() if c_all.numel() else torch.zeros((), device=device)
    c, cbf_v, wm_v = c_all, case.cbf, case.wm
    if voxels is not None:
        c, cbf_v, wm_v = c_all[torch.as_tensor(voxels, device=device)], case.cbf[voxels], case.wm[voxels]
    cbf = torch.as_tensor(cbf_v, dtype=torch.float32, device=device) / case.fit.sensitivity + c
    after = torch.as_tensor(normal_cbf(wm_v) / case.fit.sensitivity, dtype=torch.float32, device=device)
    out = simulate_tissue_death_torch(cbf.clamp_min(0.0), hours=case.hours, reperfusion_h=case.rep, cbf_after=after,
                                      wm_fraction=torch.as_tensor(wm_v, dtype=torch.float32, device=device),
                                      dt_s=float(s["dt_s"]), dtype=torch.float32, device=str(device))
    return out["dead"], pen


def _dead_loss(dead, target, s, device):
    from neurohybrid.solvers.stroke import CORE_THRESHOLD

    y = torch.as_tensor(target, dtype=torch.float32, device=device)
    return soft_dice_loss(torch.sigmoid((dead - CORE_THRESHOLD) / float(s["soft_tau"])), y)


class Residual(StrokeFamily):
    name = "residual"
    trains_across_subjects = True

    def net(self):
        return TinyCNN(4, 1, int(self.s["hidden"]), 3, zero_init=True).to(self.device)

    def fit_subject(self, inputs, trained):
        return self.calibrate(inputs)

    def train_correction(self, cases, extra=None):
        from neurohybrid.hybrid.training import train_loop

        net = self.net()
        lam = float(self.s["residual_penalty"])
        # As for the UDE: each epoch solves the (per-voxel) tissue-death model on a seeded random
        # subset of every case's candidate voxels (residual_train_voxels; 0 = all); the CNN still
        # sees the whole image and the penalty covers every voxel. The soft Dice of the subset is a
        # minibatch estimate of the full one; unrolling ~500 RK4 steps on ~16k voxels per subject
        # and epoch made this the demo's most expensive training.
        rng = np.random.default_rng(self.seed)
        n_vox = int(self.s["residual_train_voxels"])

        def loss_fn(idx):
            total = 0.0
            for i in idx:
                case = cases[i]
                voxels = None
                if 0 < n_vox < case.target.size:
                    voxels = rng.choice(case.target.size, size=n_vox, replace=False)
                dead, pen = residual_dead(net, case, self.s, self.device, voxels)
                target = case.target if voxels is None else case.target[voxels]
                total = total + _dead_loss(dead, target, self.s, self.device) + lam * pen
            return total / len(idx)

        result = train_loop(net, loss_fn, len(cases), **self.train_kw())
        return {"state_dict": net.state_dict(), "history": result.history, "settings": self.s, **(extra or {})}

    def train(self, pairs):
        return self.train_correction([_Case(i, self.fit_subject(i, None), self.s, t) for i, t in pairs])

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        fit = self.fit_subject(inputs, trained)
        t = time.perf_counter()
        net = self.net()
        net.load_state_dict(trained["state_dict"])
        case = _Case(inputs, fit, self.s)
        dead = np.zeros(0, np.float32)
        if case.cand.any():
            with torch.no_grad():
                d, _ = residual_dead(net, case, self.s, self.device)
            dead = d.cpu().numpy()
        dead = case.on_grid(dead, inputs.arrays["cbf"].shape)
        return Forecast(dict(infarct=mech.infarct_from_dead(dead, inputs.arrays["core"]), dead=dead), fit.parameters(),
                        fit.seconds, time.perf_counter() - t, fit.diagnostics())


def train_amortised(family: StrokeFamily, pairs) -> dict:
    """Labels: each training subject's sigma calibrated on its acute core AND follow-up infarct."""
    # amortised and amortised_residual train this same network (same seed, labels and settings): the
    # second family of a training process gets the first one's result (random states included)
    from neurohybrid.hybrid import cache

    return cache.memo("stroke.train_amortised", (pairs, family.s, family.train_kw(), str(family.device)),
                      lambda: _train_amortised(family, pairs), rng=True)


def _train_amortised(family: StrokeFamily, pairs) -> dict:
    """``train_amortised`` without the memo."""
    xs, ys, labels = [], [], []
    for inputs, target in pairs:
        tgt = cropped_target(inputs, target)
        cand = mech.candidates(inputs, family.s)
        obs = [(float(inputs.meta["hours_acute"]), inputs.arrays["core"][cand]), (float(inputs.meta["hours_followup"]), tgt[cand])]
        # only sigma is used (no profile interval); amortised and amortised_residual share these fits
        fit = mech.calibrate(inputs, family.s, observations=obs, interval=False)
        labels.append({"subject": inputs.subject, "sensitivity": fit.sensitivity})
        xs.append(family.tensor(_image(inputs, _box(inputs, family.s)))[None])
        ys.append(torch.tensor([[math.log(fit.sensitivity)]], device=family.device))
    net = ParamNet(7, 1, int(family.s["hidden"])).to(family.device)
    history = train_param_net(net, xs, ys, family.train_kw())
    return {"amortised_state_dict": net.state_dict(), "amortised_history": history, "labels": labels}


def amortised_fit(family: StrokeFamily, inputs, trained) -> mech.StrokeFit:
    start = time.perf_counter()
    net = ParamNet(7, 1, int(family.s["hidden"])).to(family.device)
    net.load_state_dict(trained["amortised_state_dict"])
    with torch.no_grad():
        z = float(net(family.tensor(_image(inputs, _box(inputs, family.s)))[None])[0, 0])
    sigma = float(np.clip(math.exp(z), float(family.s["sens_min"]), float(family.s["sens_max"])))
    return mech.StrokeFit(sigma, seconds=time.perf_counter() - start)


class Amortised(StrokeFamily):
    name = "amortised"
    trains_across_subjects = True

    def train(self, pairs):
        out = train_amortised(self, pairs)
        return {"state_dict": out["amortised_state_dict"], **out, "settings": self.s}

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        fit = amortised_fit(self, inputs, trained)
        t = time.perf_counter()
        dead = mech.forecast_dead(inputs, fit, self.s)
        return Forecast(dict(infarct=mech.infarct_from_dead(dead, inputs.arrays["core"]), dead=dead), fit.parameters(),
                        fit.seconds, time.perf_counter() - t, fit.diagnostics())


class AmortisedResidual(Residual):
    name = "amortised_residual"

    def fit_subject(self, inputs, trained):
        return amortised_fit(self, inputs, trained)

    def train(self, pairs):
        amortised = train_amortised(self, pairs)
        return self.train_correction([_Case(i, amortised_fit(self, i, amortised), self.s, t) for i, t in pairs], amortised)


# ---------------------------------------------------------------------------------------------
# UDE: pointwise neural term in the tissue-death ODE (torchdiffeq)
# ---------------------------------------------------------------------------------------------

class PointwiseCorrection(nn.Module):
    """g(u (B, 2N) = [D, T], covariates (B, N, 1) = H) -> (B, 2N): one MLP shared by every voxel.
    Zero-initialised (starts as the mechanistic model); outputs scaled to per-second rates (2e-6: a unit output moves D by ~0.2 per day)."""

    def __init__(self, hidden=16, scale=2e-6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = scale

    def forward(self, u, covariates=None, lap=None):
        b, n2 = u.shape
        n = n2 // 2
        h = covariates.expand(b, n, covariates.shape[-1])[..., 0]
        x = torch.stack([u[:, :n], u[:, n:], h], dim=-1)
        out = self.scale * self.net(x)
        return torch.cat([out[..., 0], out[..., 1]], dim=1)


def _xue_rhs(h):
    from neurohybrid.solvers.stroke import XUE2021 as P

    n = h.shape[-1]

    def rhs(u):
        d, tox = u[:, :n], u[:, n:]
        alive = 1.0 - d
        return torch.cat([P["kf"] * tox * alive, (P["kt"] * h - P["kb"] * tox * (1.0 - h)) * alive], dim=1)

    return rhs


def _hypoxia(case: _Case):
    from neurohybrid.solvers.stroke import hypoxic_fraction, normal_cbf

    before = hypoxic_fraction(case.cbf / case.fit.sensitivity, case.wm)
    after = hypoxic_fraction(normal_cbf(case.wm) / case.fit.sensitivity, case.wm)
    return before.astype(np.float32), after.astype(np.float32)


def ude_dead(model, case: _Case, s, device, voxels=None):
    """D at follow-up on the case's candidate voxels (or on the subset ``voxels`` of them)."""
    segments = []
    h_before, h_after = _hypoxia(case)
    if voxels is not None:
        h_before, h_after = h_before[voxels], h_after[voxels]
    t_switch = case.rep if case.rep is not None else case.hours
    segments.append((0.0, t_switch, h_before))
    if case.rep is not None:
        segments.append((case.rep, case.hours, h_after))
    n = h_before.size
    u = torch.zeros(1, 2 * n, device=device)
    for t0, t1, h in segments:
        if t1 <= t0:
            continue
        ht = torch.as_tensor(h, device=device)[None]
        model.dynamics.mechanistic = _xue_rhs(ht)
        steps = max(1, math.ceil((t1 - t0) * 3600.0 / float(s["dt_s"]) - 1e-9))
        model.step_size = (t1 - t0) * 3600.0 / steps
        u = model(u, [t1 * 3600.0], covariates=ht[..., None], t0=t0 * 3600.0)[:, -1]
    return u[0, :n].clamp(0.0, 1.0)


class UDE(StrokeFamily):
    name = "ude"
    trains_across_subjects = True

    def model(self):
        from neurohybrid.hybrid.neural_ode import HybridDynamics, NeuralODE

        corr = PointwiseCorrection(hidden=2 * int(self.s["hidden"])).to(self.device)
        return NeuralODE(HybridDynamics(lambda u: torch.zeros_like(u), corr), method="rk4")

    def train(self, pairs):
        from neurohybrid.hybrid.training import train_loop

        cases = [_Case(i, self.calibrate(i), self.s, t) for i, t in pairs]
        model = self.model()
        # The correction is pointwise (no coupling between voxels), so each epoch trains on a seeded
        # random subset of every case's voxels: backpropagating through hundreds of RK4 steps on all
        # of them took 20 GB on the demo cohort (the adjoint cannot be used: the mechanistic term
        # changes between segments and cases).
        rng = np.random.default_rng(self.seed)
        n_vox = int(self.s["ude_train_voxels"])

        def loss_fn(idx):
            total = 0.0
            for i in idx:
                case = cases[i]
                voxels = rng.choice(case.target.size, size=min(n_vox, case.target.size), replace=False)
                dead = ude_dead(model, case, self.s, self.device, voxels)
                total = total + _dead_loss(dead, case.target[voxels], self.s, self.device)
            return total / len(idx)

        result = train_loop(model.dynamics.correction, loss_fn, len(cases), **self.train_kw())
        return {"state_dict": model.dynamics.correction.state_dict(), "history": result.history, "settings": self.s}

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        fit = self.calibrate(inputs)
        t = time.perf_counter()
        model = self.model()
        model.dynamics.correction.load_state_dict(trained["state_dict"])
        case = _Case(inputs, fit, self.s)
        dead = np.zeros(0, np.float32)
        if case.cand.any():
            with torch.no_grad():
                dead = ude_dead(model, case, self.s, self.device).cpu().numpy()
        dead = case.on_grid(dead, inputs.arrays["cbf"].shape)
        return Forecast(dict(infarct=mech.infarct_from_dead(dead, inputs.arrays["core"]), dead=dead), fit.parameters(),
                        fit.seconds, time.perf_counter() - t, fit.diagnostics())


# ---------------------------------------------------------------------------------------------
# solver in the loop: large-step semi-implicit solver + pointwise correction
# ---------------------------------------------------------------------------------------------

class CoarseXueStep:
    """One step of `hours` of the Xue model, semi-implicit (T implicit in its decay, then D with the
    new T): unconditionally stable at steps where explicit RK4 (kb dt < 2.8, dt < ~20 min) is not,
    and first-order accurate. State u (M, 2N) = [D, T]; covariates (M, N, 1) = H."""

    def __init__(self, hours):
        self.hours = float(hours)

    def __call__(self, u, covariates):
        from neurohybrid.solvers.stroke import XUE2021 as P

        dt = self.hours * 3600.0
        m, n2 = u.shape
        n = n2 // 2
        h = covariates.expand(m, n, 1)[..., 0]
        d, tox = u[:, :n], u[:, n:]
        alive = 1.0 - d
        tox = (tox + dt * P["kt"] * h * alive) / (1.0 + dt * P["kb"] * (1.0 - h) * alive)
        d = 1.0 - alive * torch.exp(-dt * P["kf"] * tox)  # exact for D given T over the step
        return torch.cat([d, tox], dim=1)


class SolCorrection(PointwiseCorrection):
    """The SOL state correction: same pointwise MLP, outputs in state units (not rates)."""

    def __init__(self, hidden=16):
        super().__init__(hidden, scale=0.01)


class SolverInLoop(StrokeFamily):
    name = "sol"
    trains_across_subjects = True
    precomputed = False
    max_train_voxels = 3000

    def model(self, hours):
        from neurohybrid.hybrid.solver_in_loop import CorrectedSolver

        return CorrectedSolver(CoarseXueStep(hours), SolCorrection(2 * int(self.s["hidden"])).to(self.device))

    def training_data(self, pairs):
        """One member of every candidate voxel of every training subject (the model is pointwise):
        fine trajectories from onset under the acute flow and, for reperfused subjects, from the
        reperfusion state under the restored flow, sampled every `sol_step_hours`."""
        from neurohybrid.hybrid import cache
        from neurohybrid.solvers.stroke import hypoxic_fraction, normal_cbf, simulate_tissue_death

        s = self.s
        step, k = float(s["sol_step_hours"]), int(s["sol_train_steps"])
        save = [step * i for i in range(1, k + 1)]

        def trajectories(inputs, fit):
            case = _Case(inputs, fit, s)
            out_d, out_t, out_h = [], [], []
            if case.cbf.size == 0:
                return out_d, out_t, out_h
            flows = [(case.cbf / fit.sensitivity, None, None)]
            if case.rep is not None:
                start = simulate_tissue_death(case.cbf / fit.sensitivity, hours=case.rep, wm_fraction=case.wm,
                                              dt_s=float(s["fine_dt_s"]), threads=int(s["threads"]))
                flows.append((normal_cbf(case.wm) / fit.sensitivity, start["dead"], start["toxic"]))
            for flow, d0, t0 in flows:
                out = simulate_tissue_death(flow, hours=save[-1], wm_fraction=case.wm, dt_s=float(s["fine_dt_s"]),
                                            save_hours=save, dead0=d0, toxic0=t0, threads=int(s["threads"]))
                z = np.zeros_like(flow) if d0 is None else d0
                zt = np.zeros_like(flow) if t0 is None else t0
                out_d.append(np.vstack([z[None], out["dead"]]))
                out_t.append(np.vstack([zt[None], out["toxic"]]))
                out_h.append(hypoxic_fraction(flow, case.wm))
            return out_d, out_t, out_h

        ds, ts, hs = [], [], []
        for inputs, _ in pairs:
            fit = self.calibrate(inputs)
            # the same fine trajectories train sol and sol_precomputed (memoised per process)
            d_, t_, h_ = cache.memo("stroke.sol_fine_trajectories", (inputs, s, fit.sensitivity),
                                    lambda: trajectories(inputs, fit))
            ds += d_
            ts += t_
            hs += h_
        if not ds:
            raise InputError("no training subject has hypoperfused tissue: nothing to train the SOL correction on")
        d, t, h = np.concatenate(ds, axis=1), np.concatenate(ts, axis=1), np.concatenate(hs)
        if h.size > self.max_train_voxels:
            pick = np.random.default_rng(self.seed).choice(h.size, self.max_train_voxels, replace=False)
            d, t, h = d[:, pick], t[:, pick], h[pick]
        fine = self.tensor(np.concatenate([d, t], axis=1))[None]  # (1, K+1, 2N)
        return fine, self.tensor(h)[None, :, None]

    def train(self, pairs):
        fine, cov = self.training_data(pairs)
        model = self.model(float(self.s["sol_step_hours"]))
        kw = self.train_kw()
        kw["epochs"] = 4 * kw["epochs"]  # one pointwise MLP: cheap epochs
        return train_corrected_solver(model, fine, cov, self.s, kw, precomputed=self.precomputed)

    def forecast(self, inputs, trained):
        from neurohybrid.hybrid import cache
        from neurohybrid.hybrid.solver_in_loop import time_call

        check_trained(trained, self.name)
        s = self.s
        fit = self.calibrate(inputs)
        case = _Case(inputs, fit, s)
        h_before, h_after = _hypoxia(case)
        segments = [(0.0, case.rep if case.rep is not None else case.hours, h_before)]
        if case.rep is not None:
            segments.append((case.rep, case.hours, h_after))
        model = self.model(float(s["sol_step_hours"]))
        model.correction.load_state_dict(trained["state_dict"])
        n = case.cbf.size

        def run(corrected=True):
            u = torch.zeros(1, 2 * n, device=self.device)
            for t0, t1, h in segments:
                if t1 <= t0:
                    continue
                steps = max(1, math.ceil((t1 - t0) / float(s["sol_step_hours"]) - 1e-9))
                model.coarse_step.hours = (t1 - t0) / steps
                model.set_context(torch.as_tensor(h, device=self.device)[None, :, None])
                for _ in range(steps):
                    u = model.step(u) if corrected else model.coarse_step(u, model.covariates)
                    u = torch.cat([u[:, :n].clamp(0.0, 1.0), u[:, n:].clamp_min(0.0)], dim=1)
            return u[0, :n]

        def run_fine():
            return mech.simulate(case.cbf, case.wm, fit.sensitivity, case.hours, case.rep, s, dt_s=float(s["fine_dt_s"]))

        def fine_reference():
            """(fine solution, best-of-2 wall time of the fine solve): the run that gives the solution is one of the two."""
            if not n:
                return np.zeros(0), 0.0
            start = time.perf_counter()
            d = run_fine()
            return d, min(time.perf_counter() - start, time_call(run_fine, repeats=1))

        t = time.perf_counter()
        with torch.no_grad():
            d_sol = run().cpu().numpy()
            d_coarse = run(False).cpu().numpy()
        inference = time.perf_counter() - t
        # the same reference for sol and sol_precomputed (memoised per process)
        d_fine, fine_cost = cache.memo("stroke.sol_fine_reference", (inputs, s, fit.sensitivity), fine_reference)
        sol_cost = time_call(run, repeats=2)

        def rel(x):
            return float(np.linalg.norm(x - d_fine) / max(np.linalg.norm(d_fine), 1e-12))

        dead = case.on_grid(d_sol, inputs.arrays["cbf"].shape)
        extra = dict(**fit.diagnostics(), sol_error=rel(d_sol), coarse_error=rel(d_coarse), sol_cost_seconds=sol_cost, fine_cost_seconds=fine_cost,
                     sol_error_metric=f"relative L2 error of the dead fraction vs the fine RK4 solver (dt {s['fine_dt_s']} s)",
                     training_target=trained.get("training_target"))
        return Forecast(dict(infarct=mech.infarct_from_dead(dead, inputs.arrays["core"]), dead=dead), fit.parameters(),
                        fit.seconds, inference, extra)


class SolverPrecomputed(SolverInLoop):
    name = "sol_precomputed"
    precomputed = True


FAMILIES = {f.name: f for f in (Persistence, Mechanistic, DataDriven, Residual, UDE, SolverInLoop, SolverPrecomputed,
                                Amortised, AmortisedResidual)}
