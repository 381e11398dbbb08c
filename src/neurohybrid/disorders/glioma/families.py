"""The glioma model families (see ``neurohybrid.disorders.base.FAMILIES``).

Hybrids start from the calibrated mechanistic state at the last observed session (the mechanistic fit
reproduces the observed sessions) and differ in how they advance it to the forecast day:

* residual (APHYNITY, parallel): du/dt = f_FK(u; D_w, rho) + g_phi(u, c), g a small 3D CNN of the
  state and the covariates c = (WM, GM, CSF probability, distance to the ventricles) from the
  subject's own segmentation (``covariate_maps``), trained across subjects with loss = soft Dice +
  lambda * mean ||g||^2 (``hybrid.residual``).
* ude: the same equation with a pointwise MLP g(u, c) gated by u (1 - u) (``hybrid.neural_ode``),
  no penalty, torchdiffeq.
* sol / sol_precomputed (series): a 2x coarser grid stepping `sol_step_days` at a time, its state
  corrected after each step by a CNN; SOL-n unrolls n steps against the fine (Numba) solver, the
  pre-computed variant learns one-step targets (``hybrid.solver_in_loop``). Same network class.
* amortised (series): a CNN maps the first session's masks + tissue to (D_w, rho); only t0 is fitted.
* amortised_residual (parallel-series): amortised parameters + the residual correction.
* data_driven: a CNN from the last masks, the covariates c and the time gap to the follow-up masks.

Every family forecasts from the same information, starting at the last observed session: the
physics families from the calibrated state at the last session, data_driven / persistence from the
last masks (tests: test_glioma_models ``*_start_from_*``).

Training (data_driven and the parallel hybrids, ``patch_train``): each training subject's tumour box
is cut into 8 patches (octants around the tumour). Mini-batches and the validation subset
(``val_fraction``, early stopping after ``patience`` epochs, best epoch restored) are drawn from
whole training subjects when a fold has at least 3, else from the patches; checkpoints keep
``history``, ``val_history`` and the loss before / after training. The SOL and amortised networks
keep their own epoch budgets (``sol_epochs``, ``amortised_epochs``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from neurohybrid.disorders import voxel
from neurohybrid.disorders.base import Forecast, SubjectData, shared_work
from neurohybrid.disorders.glioma import mechanistic as mech
from neurohybrid.disorders.glioma.inputs import cropped_target
from neurohybrid.disorders.networks import GridCorrection, ParamNet, TinyCNN, VoxelCorrection, flat_covariates, soft_dice_loss
from neurohybrid.disorders.voxel_family import (VoxelFamily, check_trained, train_corrected_solver,
                                                train_param_net)
from neurohybrid.errors import InputError

GAP_SCALE_DAYS = 100.0


def _observe(u: np.ndarray, fit) -> dict:
    from neurohybrid.solvers.glioma import observe

    t1, fl = observe(np.asarray(u), fit.theta_t1gd, min(fit.theta_flair, fit.theta_t1gd))
    return dict(t1gd=np.asarray(t1, bool), flair=np.asarray(fl, bool))


def _spacing(inputs: SubjectData):
    return tuple(float(v) for v in inputs.meta["voxel_mm"])


class GliomaFamily(VoxelFamily):
    settings = staticmethod(mech.settings)


class Persistence(GliomaFamily):
    name = "persistence"

    def forecast(self, inputs, trained):
        t = time.perf_counter()
        out = dict(t1gd=inputs.arrays["t1gd"][-1].astype(bool), flair=inputs.arrays["flair"][-1].astype(bool))
        return Forecast(out, {"carried_session": inputs.meta["sessions"][-1]}, 0.0, time.perf_counter() - t)


class Mechanistic(GliomaFamily):
    name = "mechanistic"

    def forecast(self, inputs, trained):
        fit = mech.calibrate_inputs(inputs, self.s, seed=self.seed)
        d_last, d_target = mech.forecast_days(inputs)
        t = time.perf_counter()
        # saving at the last session too keeps the step schedule identical to the hybrids' (they
        # restart from that state), so a hybrid with a zero correction reproduces this exactly
        u = mech.state_at(inputs, fit, [d_last, d_target], self.s)[-1]
        return Forecast(dict(celldensity=u, **_observe(u, fit)), fit.parameters(), fit.seconds, time.perf_counter() - t,
                        {"uncertainty": "spread of Nelder-Mead restarts reaching the best loss (log scale)"})


# ---------------------------------------------------------------------------------------------
# what the trained networks see, and how they are trained (patches, validation, early stopping)
# ---------------------------------------------------------------------------------------------

DIST_SCALE_MM = 30.0  # the ventricle-distance channel is min(d, 90 mm) / 30 mm, in [0, 3]


def covariate_maps(a: dict, box=None) -> np.ndarray:
    """(4, X, Y, Z) float32: WM, GM, CSF probability and the distance to the ventricles (scaled),
    all from the subject's own segmentation (``inputs.ventricle_distance``), cut to ``box``."""
    if "csf" not in a or "ventricle_mm" not in a:
        raise InputError("glioma model inputs lack the CSF map and ventricle distance: rebuild them with "
                         "`neurohybrid inputs` (preprocessing writes the res-model CSF probseg)")
    box = box if box is not None else (slice(None),) * 3
    dist = np.minimum(np.asarray(a["ventricle_mm"], np.float32), 3.0 * DIST_SCALE_MM) / DIST_SCALE_MM
    return np.stack([a["wm"][box], a["gm"][box], a["csf"][box], dist[box]]).astype(np.float32)


N_COVARIATES = 4


def octants(mask_a: np.ndarray, mask_b: np.ndarray) -> list[np.ndarray]:
    """The 8 training patches of a box: its octants around the centroid of the tumour (the union of
    the two masks), so every patch holds part of the tumour's front. Validation patches are drawn
    from these (``hybrid.training.split_validation``): training subjects only."""
    union = mask_a | mask_b
    shape = union.shape
    center = np.argwhere(union).mean(axis=0) if union.any() else (np.array(shape) - 1) / 2.0
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    sides = [g <= c for g, c in zip(grids, center)]
    out = []
    for code in range(8):
        m = np.ones(shape, bool)
        for axis in range(3):
            m &= sides[axis] if (code >> axis) & 1 else ~sides[axis]
        if m.any():
            out.append(m.astype(np.float32))
    return out


def _region_dice(p, m, region):
    return soft_dice_loss(p * region, m * region)


MIN_SUBJECTS_TO_VALIDATE = 3  # hybrid.training.split_validation holds out nothing below this


def patch_train(module, cases, case_loss, train_kw: dict):
    """Train on ``cases`` (each with its patches ``regions``); ``case_loss(case, region_indices)``
    returns the summed loss of those patches of one case (one forward pass or rollout per case in a
    mini-batch).

    The items that mini-batches and the validation split are drawn from: whole subjects (all their
    patches) when there are at least 3 training subjects, so early stopping sees subjects the
    network was not trained on and each step costs one rollout; with fewer, the patches (a
    validation set of patches of the training subjects; ``batch_size`` then counts patches).
    Returns the ``hybrid.training.TrainResult`` with ``initial_loss`` / ``final_loss`` (the training
    items' loss before training and after, at the restored best epoch) and ``items`` added."""
    from neurohybrid.hybrid.training import train_loop

    if len(cases) >= MIN_SUBJECTS_TO_VALIDATE and float(train_kw.get("val_fraction", 0.0)) > 0:
        items = [[(ci, r) for r in range(len(c.regions))] for ci, c in enumerate(cases)]
        unit = "subject"
    else:
        items = [[(ci, r)] for ci, c in enumerate(cases) for r in range(len(c.regions))]
        unit = "patch"

    def loss_fn(idx):
        by_case: dict[int, list[int]] = {}
        for i in idx:
            for ci, r in items[i]:
                by_case.setdefault(ci, []).append(r)
        total = 0.0
        for ci, regions in by_case.items():
            total = total + case_loss(cases[ci], regions)
        return total / sum(len(items[i]) for i in idx)  # mean loss per patch

    from neurohybrid.hybrid.training import split_validation

    train_idx, _ = split_validation(len(items), float(train_kw.get("val_fraction", 0.0)), int(train_kw.get("seed", 0)))
    with torch.no_grad():
        initial = float(loss_fn(train_idx))
    result = train_loop(module, loss_fn, len(items), **train_kw)
    with torch.no_grad():
        result.initial_loss, result.final_loss = initial, float(loss_fn(train_idx))
    result.items = [[list(x) for x in item] for item in items]
    result.item_unit = unit
    return result


def _checkpoint(module, result, s, **extra) -> dict:
    """The trained weights with the loss curves: training loss per epoch (``history``), validation
    loss per epoch (``val_history``), and the training patches' loss before and after training."""
    return {"state_dict": module.state_dict(), "history": result.history, "val_history": result.val_history,
            "best_epoch": result.best_epoch, "train_indices": result.train_indices, "val_indices": result.val_indices,
            "initial_loss": result.initial_loss, "final_loss": result.final_loss, "loop_seconds": result.seconds,
            "items": result.items, "item_unit": result.item_unit,
            "settings": s, **extra}


# ---------------------------------------------------------------------------------------------
# data-driven
# ---------------------------------------------------------------------------------------------

def _dd_features(cov, t1, fl, gap) -> np.ndarray:
    return np.concatenate([cov, np.stack([t1, fl, np.full(t1.shape, gap / GAP_SCALE_DAYS, np.float32)])]).astype(np.float32)


def _prior_logits(t1, fl) -> np.ndarray:
    # the CNN predicts a change from "no change": persistence is its starting point
    return (3.0 * (2.0 * np.stack([t1, fl]).astype(np.float32) - 1.0)).astype(np.float32)


DD_HALO = 4  # receptive-field radius of TinyCNN(depth 3, second layer dilated by 2), in voxels


def _patch_crop(region: np.ndarray, halo: int):
    """The bounding box of a patch enlarged by ``halo`` voxels (clipped): a fully convolutional
    network evaluated on it gives exactly its whole-box output inside the patch."""
    idx = np.argwhere(region > 0)
    lo = np.maximum(idx.min(axis=0) - halo, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + halo, region.shape)
    return (slice(None), slice(None)) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


class _DDCase:
    def __init__(self, x, prior, y, regions, crops):
        self.x, self.prior, self.y, self.regions, self.crops = x, prior, y, regions, crops


class DataDriven(GliomaFamily):
    """A CNN from the last observed masks, tissue, CSF, ventricle distance and the time gap to the
    follow-up masks: it starts from the last observed state like every other family."""

    name = "data_driven"
    trains_across_subjects = True

    def net(self):
        return TinyCNN(N_COVARIATES + 3, 2, int(self.s["hidden"]), 3, zero_init=True).to(self.device)

    def train(self, pairs):
        cases = []
        for inputs, target in pairs:
            a = inputs.arrays
            tgt = cropped_target(inputs, target)
            box = voxel.tumour_box([a["flair"][-1], tgt["flair"]], a["wm"].shape, int(self.s["train_margin"]) + 2)
            gap = float(inputs.meta["target_day"]) - float(inputs.meta["days"][-1])
            x = _dd_features(covariate_maps(a, box), a["t1gd"][-1][box], a["flair"][-1][box], gap)
            octs = octants(a["flair"][-1][box], tgt["flair"][box])
            crops = [_patch_crop(r, DD_HALO) for r in octs]
            regions = [self.tensor(r)[None, None][sl] for r, sl in zip(octs, crops)]
            cases.append(_DDCase(self.tensor(x)[None], self.tensor(_prior_logits(a["t1gd"][-1][box], a["flair"][-1][box]))[None],
                                 self.tensor(np.stack([tgt["t1gd"][box], tgt["flair"][box]]))[None], regions, crops))
        net = self.net()

        def case_loss(c, regions):
            # each patch is evaluated on its own crop (patch + receptive field): the same logits
            # inside the patch as on the whole box, at a fraction of the cost
            total = 0.0
            for r in regions:
                sl, w = c.crops[r], c.regions[r]
                logits = net(c.x[sl]) + c.prior[sl]
                y = c.y[sl]
                bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / (2 * w.sum()).clamp_min(1.0)
                total = total + bce + _region_dice(torch.sigmoid(logits), y, w)
            return total

        result = patch_train(net, cases, case_loss, self.train_kw())
        return _checkpoint(net, result, self.s)

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        net = self.net()
        net.load_state_dict(trained["state_dict"])
        t = time.perf_counter()
        a = inputs.arrays
        gap = float(inputs.meta["target_day"]) - float(inputs.meta["days"][-1])
        with torch.no_grad():
            x = self.tensor(_dd_features(covariate_maps(a), a["t1gd"][-1], a["flair"][-1], gap))[None]
            logits = (net(x) + self.tensor(_prior_logits(a["t1gd"][-1], a["flair"][-1]))[None])[0].cpu().numpy()
        tissue = (a["wm"] + a["gm"]) > 0
        out = dict(t1gd=(logits[0] > 0) & tissue, flair=((logits[1] > 0) | (logits[0] > 0)) & tissue)
        return Forecast(out, {"gap_days": gap}, 0.0, time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# parallel hybrids: residual (APHYNITY) and UDE, from the mechanistic state at the last session
# ---------------------------------------------------------------------------------------------

class _Case:
    """One subject prepared for a hybrid: tissue, covariates (``covariate_maps``), the mechanistic
    state at the last session, the gap; for training also the target masks and the patches."""

    def __init__(self, wm, gm, cov, u_last, gap, fit, spacing, target=None, regions=None):
        self.wm, self.gm, self.cov, self.u_last, self.gap, self.fit, self.spacing = wm, gm, cov, u_last, gap, fit, spacing
        self.target, self.regions = target, regions or []


def _mech_rhs(wm_t, gm_t, spacing, fit, s):
    """du/dt = div(D grad u) + rho u (1 - u) on (B, N) states (for torchdiffeq)."""
    from neurohybrid.solvers.glioma import _diffusion_torch, glioma_coefficients_torch

    shape = tuple(wm_t.shape)
    coeffs = glioma_coefficients_torch(wm_t, gm_t, spacing, fit.dw, float(s["dg_ratio"]))

    def rhs(u):
        u3 = u.reshape(-1, *shape)
        # the twin's explicit diffusion step over a unit time: its increment is div(D grad u)
        div = _diffusion_torch(u3, coeffs, 1.0) - u3
        return (div + fit.rho * u3 * (1 - u3)).reshape(u.shape[0], -1)

    return rhs


def _step_plan(wm, gm, spacing, fit, gap, s) -> tuple[int, float]:
    """(n, h): the Numba solver's steps for this segment (same stable_dt, equal split of the segment)."""
    from neurohybrid.solvers.glioma import stable_dt

    dmax = float((fit.dw * np.asarray(wm, np.float32) + fit.dw * float(s["dg_ratio"]) * np.asarray(gm, np.float32)).max())
    dt = stable_dt(dmax, spacing, fit.rho, max_rho_dt=float(s["max_rho_dt"]))
    n = max(1, math.ceil(gap / dt - 1e-9))
    return n, gap / n


def split_rollout(net, case, s, device, *, penalty: bool):
    """Residual hybrid: the growth rate becomes a field rho(x) = rho exp(delta_phi(x)), delta a small
    CNN of (u at the last session, wm, gm, csf, ventricle distance), i.e. du/dt = f_FK(u; D_w, rho)
    + F_a with F_a = rho (e^delta - 1) u (1 - u): zero where there is no tumour, and u stays in
    [0, 1]. Integrated exactly like the solver (Strang: exact logistic half steps around fused
    diffusion + reaction steps), so delta = 0 reproduces ``simulate_glioma`` step for step. The
    correction is computed once per rollout (a static field), which keeps training at one CNN pass
    per subject. Returns (u (X, Y, Z), mean delta^2 over tissue, or None).

    ``hybrid.residual.ParallelResidual`` is not used: it integrates the summed right-hand side with
    torchdiffeq, which for a zero correction is not the solver's (split) scheme.
    """
    from neurohybrid.solvers.glioma import glioma_coefficients_torch, glioma_step_torch

    wm_t = torch.as_tensor(case.wm, dtype=torch.float32, device=device)
    gm_t = torch.as_tensor(case.gm, dtype=torch.float32, device=device)
    cov = torch.as_tensor(case.cov, dtype=torch.float32, device=device)
    coeffs = glioma_coefficients_torch(wm_t, gm_t, case.spacing, case.fit.dw, float(s["dg_ratio"]))
    tissue = ((wm_t + gm_t) > 0).to(torch.float32)
    u = torch.as_tensor(case.u_last, dtype=torch.float32, device=device) * tissue
    delta = RESIDUAL_SCALE * net(torch.cat([u[None], cov])[None])[0, 0] * tissue
    rho = case.fit.rho * torch.exp(delta)
    n, h = _step_plan(case.wm, case.gm, case.spacing, case.fit, case.gap, s)
    u = glioma_step_torch(u, coeffs, 0.0, rho, h / 2)  # diffusion over 0 days: the opening half reaction step
    for k in range(n):
        u = glioma_step_torch(u, coeffs, h, rho, h if k < n - 1 else h / 2)
    pen = (delta ** 2).sum() / tissue.sum().clamp_min(1.0) if penalty else None
    return u, pen


RESIDUAL_SCALE = 0.1  # a unit network output changes rho by ~10%: keeps Adam steps at lr 1e-2 from overshooting
UDE_SCALE = 0.01  # a unit network output adds 0.01/day to the growth rate of u (1 - u)


class GatedCorrection(VoxelCorrection):
    """The UDE's correction g(u, covariates) = u (1 - u) * MLP(u, covariates): an extra logistic
    growth rate that vanishes where there is no tumour (never creates density in healthy tissue)
    and at u = 1 (keeps u <= 1). Same parameters (state_dict) as ``VoxelCorrection``."""

    def forward(self, u, covariates=None, lap=None):
        return u * (1.0 - u) * super().forward(u, covariates, lap)


class _OnVoxels(torch.nn.Module):
    """Evaluate a pointwise correction only on the voxels ``idx`` (zero elsewhere)."""

    def __init__(self, inner, idx):
        super().__init__()
        self.inner, self.idx = inner, idx

    def forward(self, u, covariates=None, lap=None):
        cov = None if covariates is None else covariates[:, self.idx]
        g = self.inner(u[:, self.idx], cov, lap)
        return torch.zeros_like(u).index_copy(1, self.idx, g)


def reachable(case) -> np.ndarray:
    """Tissue voxels the tumour can reach during the rollout: within (front travel 2 sqrt(D_w rho) *
    gap + 3 diffusion lengths sqrt(D_w gap)) of where u at the last session exceeds 1e-4. Outside,
    u stays ~0, so the UDE's gated correction u (1 - u) g is ~0 there and is not evaluated (the
    UDE's cost is its per-voxel MLP at every step)."""
    from scipy import ndimage

    fit = case.fit
    reach_mm = 2.0 * math.sqrt(fit.dw * fit.rho) * case.gap + 3.0 * math.sqrt(fit.dw * case.gap)
    k = int(math.ceil(reach_mm / min(case.spacing))) + 1
    seed = np.asarray(case.u_last) > 1e-4
    grown = ndimage.binary_dilation(seed, iterations=k) if seed.any() else seed
    return grown & ((np.asarray(case.wm) + np.asarray(case.gm)) > 0)


def node_rollout(model, case, s, device):
    """UDE: du/dt = f_FK(u) + g_phi(u, wm, gm, csf, ventricle distance) by torchdiffeq (explicit Euler
    at the solver's step), g evaluated on the voxels the tumour can reach (``reachable``)."""
    wm_t = torch.as_tensor(case.wm, dtype=torch.float32, device=device)
    gm_t = torch.as_tensor(case.gm, dtype=torch.float32, device=device)
    cov = torch.as_tensor(case.cov, dtype=torch.float32, device=device)
    u0 = torch.as_tensor(case.u_last, dtype=torch.float32, device=device).reshape(1, -1)
    idx = torch.as_tensor(np.flatnonzero(reachable(case)), dtype=torch.long, device=device)
    corr = model.dynamics.correction
    model.dynamics.mechanistic = _mech_rhs(wm_t, gm_t, case.spacing, case.fit, s)
    model.dynamics.correction = _OnVoxels(corr, idx)
    model.step_size = _step_plan(case.wm, case.gm, case.spacing, case.fit, case.gap, s)[1]
    try:
        pred = model(u0, [case.gap], covariates=flat_covariates(*cov), t0=0.0)
    finally:
        model.dynamics.correction = corr
    return pred[0, -1].reshape(case.wm.shape).clamp(0.0, 1.0)


def _mask_loss(u, target, fit, tau, region=None):
    """Soft Dice of the soft T1Gd and FLAIR observations of u against the target masks (tensors),
    restricted to ``region`` (a patch) when given."""
    p1 = torch.sigmoid((u - fit.theta_t1gd) / tau)
    pf = torch.sigmoid((u - fit.theta_flair) / tau)
    if region is None:
        return soft_dice_loss(p1, target["t1gd"]) + soft_dice_loss(pf, target["flair"])
    return _region_dice(p1, target["t1gd"], region) + _region_dice(pf, target["flair"], region)


class _ParallelHybrid(GliomaFamily):
    """Shared training/forecast of the residual and UDE families."""

    trains_across_subjects = True
    uses_penalty = True
    amortised = False

    def model(self):
        raise NotImplementedError

    def correction(self, model):
        return model

    def rollout(self, model, case, *, penalty: bool):
        return split_rollout(model, case, self.s, self.device, penalty=penalty)

    # how the mechanistic parameters are obtained (calibrated, or amortised + t0)
    def fit_subject(self, inputs, trained):
        return mech.calibrate_inputs(inputs, self.s, seed=self.seed)

    def case(self, inputs, fit, target=None) -> _Case:
        """The forecast's starting point: the calibrated state at the LAST observed session, advanced
        over the gap to the target day (the same information every family gets)."""
        d_last, d_target = mech.forecast_days(inputs)
        a = inputs.arrays
        u_last = mech.state_at(inputs, fit, [d_last], self.s)[0]
        box = (slice(None),) * 3
        tgt, regions = None, None
        if target is not None:
            tgt = cropped_target(inputs, target)
            box = voxel.tumour_box([a["flair"][-1], tgt["flair"]], a["wm"].shape, int(self.s["train_margin"]))
            regions = [self.tensor(r) for r in octants(a["flair"][-1][box], tgt["flair"][box])]
            tgt = {k: self.tensor(v[box]) for k, v in tgt.items()}
        return _Case(np.ascontiguousarray(a["wm"][box]), np.ascontiguousarray(a["gm"][box]),
                     np.ascontiguousarray(covariate_maps(a, box)), np.ascontiguousarray(u_last[box]),
                     d_target - d_last, fit, _spacing(inputs), tgt, regions)

    def train_correction(self, cases, extra=None):
        model = self.model()
        lam = float(self.s["residual_penalty"])
        tau = float(self.s["soft_tau"])

        def case_loss(c, regions):
            u, pen = self.rollout(model, c, penalty=self.uses_penalty)
            total = 0.0
            for r in regions:
                total = total + _mask_loss(u, c.target, c.fit, tau, c.regions[r]) + (lam * pen if pen is not None else 0.0)
            return total

        result = patch_train(self.correction(model), cases, case_loss, self.train_kw())
        return _checkpoint(self.correction(model), result, self.s, **(extra or {}))

    def train(self, pairs):
        cases = [self.case(inputs, self.fit_subject(inputs, None), target) for inputs, target in pairs]
        return self.train_correction(cases)

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        fit = self.fit_subject(inputs, trained)
        t = time.perf_counter()
        case = self.case(inputs, fit)
        model = self.model()
        self.correction(model).load_state_dict(trained["state_dict"])
        with torch.no_grad():
            u, _ = self.rollout(model, case, penalty=False)
        u = np.clip(u.cpu().numpy(), 0.0, 1.0)
        params = fit.parameters()
        return Forecast(dict(celldensity=u, **_observe(u, fit)), params, fit.seconds, time.perf_counter() - t)


class ResidualNet(torch.nn.Module):
    """The residual's correction network: one 3x3x3 convolution (the state and covariates of a voxel's
    neighbours), then two pointwise layers; the last starts at 0 (no correction). A third of the
    cost of ``TinyCNN``'s three 3x3x3 layers, which matters inside a rollout trained hundreds of
    times; the covariates already carry the long-range context (distance to the ventricles)."""

    def __init__(self, c_in: int, width: int = 8):
        super().__init__()
        last = torch.nn.Conv3d(width, 1, 1)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(c_in, width, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv3d(width, width, 1), torch.nn.Tanh(), last)

    def forward(self, x):
        return self.net(x)


class Residual(_ParallelHybrid):
    name = "residual"

    def model(self):
        return ResidualNet(1 + N_COVARIATES, int(self.s["hidden"])).to(self.device)


class UDE(_ParallelHybrid):
    name = "ude"
    uses_penalty = False

    def model(self):
        from neurohybrid.hybrid.neural_ode import HybridDynamics, NeuralODE

        corr = GatedCorrection(N_COVARIATES, hidden=int(self.s["hidden"]), scale=UDE_SCALE).to(self.device)
        return NeuralODE(HybridDynamics(lambda u: torch.zeros_like(u), corr), method="euler")

    def correction(self, model):
        return model.dynamics.correction

    def rollout(self, model, case, *, penalty: bool):
        return node_rollout(model, case, self.s, self.device), None


# ---------------------------------------------------------------------------------------------
# amortised inference (series) and amortised + residual (parallel-series)
# ---------------------------------------------------------------------------------------------

def _amortised_image(inputs, s) -> np.ndarray:
    a = inputs.arrays
    box = voxel.tumour_box([a["flair"][0]], a["wm"].shape, int(s["calib_margin"]))
    return np.stack([a["t1gd"][0][box], a["flair"][0][box], a["wm"][box], a["gm"][box]]).astype(np.float32)


def _label(params, s) -> np.ndarray:
    return np.array([np.log(params[0] / float(s["prior_dw"])), np.log(params[1] / float(s["prior_rho"]))], np.float32)


def train_amortised(family: GliomaFamily, pairs) -> dict:
    """Labels: each training subject's (D_w, rho) calibrated on ALL its sessions (its target is
    training data); the network learns to predict them from the first session alone."""
    # amortised and amortised_residual train this same network (same seed, labels and settings): the
    # fold's shared work trains it once, on its own seeded generators, whichever family asks first
    return shared_work(pairs).get("glioma.train_amortised", (family.s, family.train_kw(), str(family.device)),
                                  lambda: _train_amortised(family, pairs), seed=family.seed)


def _train_amortised(family: GliomaFamily, pairs) -> dict:
    """``train_amortised`` without the memo."""
    s = family.s
    xs, ys, labels = [], [], []
    for inputs, target in pairs:
        a = inputs.arrays
        tgt = cropped_target(inputs, target)
        days = list(inputs.meta["days"]) + [float(inputs.meta["target_day"])]
        fit = mech.calibrate(a["wm"], a["gm"], np.concatenate([a["t1gd"], tgt["t1gd"][None]]),
                             np.concatenate([a["flair"], tgt["flair"][None]]), days, _spacing(inputs), s)
        labels.append({"subject": inputs.subject, "dw": fit.dw, "rho": fit.rho})
        xs.append(family.tensor(_amortised_image(inputs, s))[None])
        ys.append(family.tensor(_label((fit.dw, fit.rho), s))[None])
    net = ParamNet(4, 2, int(s["hidden"])).to(family.device)
    history = train_param_net(net, xs, ys, dict(family.train_kw(), epochs=int(s["amortised_epochs"])))
    return {"amortised_state_dict": net.state_dict(), "amortised_history": history, "labels": labels}


def amortised_parameters(family: GliomaFamily, inputs, trained) -> dict:
    s = family.s
    net = ParamNet(4, 2, int(s["hidden"])).to(family.device)
    net.load_state_dict(trained["amortised_state_dict"])
    with torch.no_grad():
        z = net(family.tensor(_amortised_image(inputs, s))[None])[0].cpu().numpy()
    dw = float(np.clip(float(s["prior_dw"]) * np.exp(z[0]), *mech.DW_BOUNDS))
    rho = float(np.clip(float(s["prior_rho"]) * np.exp(z[1]), *mech.RHO_BOUNDS))
    return {"dw": dw, "rho": rho}


class Amortised(GliomaFamily):
    name = "amortised"
    trains_across_subjects = True

    def train(self, pairs):
        out = train_amortised(self, pairs)
        return {"state_dict": out["amortised_state_dict"], **out, "settings": self.s}

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        start = time.perf_counter()
        params = amortised_parameters(self, inputs, trained)
        amortised_s = time.perf_counter() - start
        fit = mech.calibrate_inputs(inputs, self.s, fixed=params)  # t0 only: D_w, rho come from the network
        d_last, d_target = mech.forecast_days(inputs)
        t = time.perf_counter()
        u = mech.state_at(inputs, fit, [d_last, d_target], self.s)[-1]
        return Forecast(dict(celldensity=u, **_observe(u, fit)), {**fit.parameters(), "amortised_seconds": amortised_s},
                        fit.seconds + amortised_s, time.perf_counter() - t)


class AmortisedResidual(_ParallelHybrid):
    name = "amortised_residual"

    def model(self):
        return Residual.model(self)

    def fit_subject(self, inputs, trained):
        return mech.calibrate_inputs(inputs, self.s, fixed=amortised_parameters(self, inputs, trained))

    def train(self, pairs):
        amortised = train_amortised(self, pairs)
        cases = [self.case(inputs, self.fit_subject(inputs, amortised), target) for inputs, target in pairs]
        return self.train_correction(cases, amortised)


# ---------------------------------------------------------------------------------------------
# solver in the loop (series): coarse grid + learned correction
# ---------------------------------------------------------------------------------------------

class CoarseGliomaStep:
    """Advance the coarse grid (2x the voxel size) by `delta` days with its own stable Euler steps.

    u: (M, X, Y, Z); covariates (M, N, 4): wm, gm, D_w, rho per voxel (per-member parameters ride
    in the covariates so that ``hybrid.solver_in_loop`` keeps them aligned with repeated members).
    """

    def __init__(self, spacing, delta, s):
        self.spacing = tuple(2.0 * h for h in spacing)
        self.delta = float(delta)
        self.s = s

    def __call__(self, u, covariates):
        from neurohybrid.solvers.glioma import glioma_coefficients_torch, glioma_step_torch, stable_dt

        m, shape = u.shape[0], tuple(u.shape[1:])
        cov = covariates.expand(m, *covariates.shape[-2:])
        wm, gm = cov[..., 0].reshape(m, *shape), cov[..., 1].reshape(m, *shape)
        dw = cov[:, 0, 2].reshape(m, 1, 1, 1)
        rho = cov[:, 0, 3].reshape(m, 1, 1, 1)
        dg = float(self.s["dg_ratio"])
        dmax = float((dw * (wm + dg * gm)).max())
        dt = stable_dt(dmax, self.spacing, float(rho.max()), max_rho_dt=float(self.s["max_rho_dt"]))
        n = max(1, math.ceil(self.delta / dt - 1e-9))
        coeffs = glioma_coefficients_torch(wm, gm, self.spacing, dw, dg)
        for _ in range(n):
            u = glioma_step_torch(u, coeffs, self.delta / n, rho)
        return u


def _pool(a: np.ndarray) -> np.ndarray:
    """2x2x2 average pooling after padding to even sizes (edge values repeated)."""
    pad = [(0, s % 2) for s in a.shape]
    a = np.pad(a, pad, mode="edge")
    x, y, z = a.shape
    return a.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5)).astype(np.float32)


def _sol_covariates(wm_c, gm_c, dw, rho):
    n = wm_c.size
    return np.stack([wm_c.ravel(), gm_c.ravel(), np.full(n, dw, np.float32), np.full(n, rho, np.float32)], -1)[None]


class SolverInLoop(GliomaFamily):
    name = "sol"
    trains_across_subjects = True
    precomputed = False

    def model(self, spacing, delta):
        from neurohybrid.hybrid.solver_in_loop import CorrectedSolver

        corr = GridCorrection(4, int(self.s["hidden"]), scale=0.01).to(self.device)
        return CorrectedSolver(CoarseGliomaStep(spacing, delta, self.s), corr)

    def training_data(self, pairs):
        """Fine (Numba) trajectories from each training subject's calibrated state at its last
        session, sampled every `sol_step_days`, pooled onto the coarse grid, in a fixed-size box
        around the tumour (one shape for the whole batch)."""
        s = self.s
        half = int(s["sol_box_vox"]) // 2
        fines, covs, spacings = [], [], []
        for inputs, _ in pairs:
            a = inputs.arrays
            fit = mech.calibrate_inputs(inputs, s, seed=self.seed)
            d_last, _ = mech.forecast_days(inputs)
            u_last = mech.state_at(inputs, fit, [d_last], s)[0]
            center = np.argwhere(a["flair"][-1] | a["t1gd"][-1]).mean(axis=0) if (a["flair"][-1].any() or a["t1gd"][-1].any()) else np.array(fit.center)
            box = []
            for c, n in zip(center, a["wm"].shape):
                size = min(2 * half, n - n % 2)
                lo = int(np.clip(round(c) - half, 0, n - size))
                box.append(slice(lo, lo + size))
            box = tuple(box)
            wm, gm, u0 = a["wm"][box], a["gm"][box], u_last[box]
            delta = float(s["sol_step_days"])
            steps = int(s["sol_train_steps"])
            states = mech.simulate(np.ascontiguousarray(wm), np.ascontiguousarray(gm), np.ascontiguousarray(u0),
                                   _spacing(inputs), fit.dw, fit.rho, [delta * k for k in range(1, steps + 1)], s)
            fines.append(np.stack([_pool(u0)] + [_pool(u) for u in states]))
            covs.append(_sol_covariates(_pool(wm), _pool(gm), fit.dw, fit.rho)[0])
            spacings.append(_spacing(inputs))
        if any(np.abs(np.subtract(sp, spacings[0])).max() > 1e-6 for sp in spacings):
            raise InputError("training subjects have different voxel sizes: SOL needs one grid")
        return self.tensor(np.stack(fines)), self.tensor(np.stack(covs)), spacings[0]

    def train(self, pairs):
        fine, cov, spacing = self.training_data(pairs)
        model = self.model(spacing, float(self.s["sol_step_days"]))
        model.correction.set_shape(fine.shape[2:])
        kw = dict(self.train_kw(), epochs=int(self.s["sol_epochs"]),
                  batch_size=None if self.s["sol_batch_size"] is None else int(self.s["sol_batch_size"]))
        return train_corrected_solver(model, fine, cov, self.s, kw, precomputed=self.precomputed)

    def forecast(self, inputs, trained):
        from neurohybrid.hybrid.solver_in_loop import time_call

        check_trained(trained, self.name)
        s = self.s
        fit = mech.calibrate_inputs(inputs, s, seed=self.seed)
        d_last, d_target = mech.forecast_days(inputs)
        gap = d_target - d_last
        a = inputs.arrays
        u_last = mech.state_at(inputs, fit, [d_last], s)[0]
        n_macro = max(1, math.ceil(gap / float(s["sol_step_days"]) - 1e-9))
        model = self.model(_spacing(inputs), gap / n_macro)
        model.correction.load_state_dict(trained["state_dict"])
        wm_c, gm_c = _pool(a["wm"]), _pool(a["gm"])
        model.correction.set_shape(wm_c.shape)
        model.set_context(self.tensor(_sol_covariates(wm_c, gm_c, fit.dw, fit.rho)))
        u0_c = self.tensor(_pool(u_last))[None]
        tissue = (a["wm"] + a["gm"]) > 0

        def upsample(uc):
            up = F.interpolate(uc[None], scale_factor=2, mode="trilinear", align_corners=False)[0, 0]
            x, y, z = a["wm"].shape
            return np.clip(up[:x, :y, :z].cpu().numpy(), 0, 1) * tissue

        def run_sol():
            return model.rollout(u0_c, n_macro)[:, -1]

        def run_coarse():
            u = u0_c
            for _ in range(n_macro):
                u = model.coarse_step(u, model.covariates)
            return u

        def run_fine():
            return mech.simulate(a["wm"], a["gm"], u_last, _spacing(inputs), fit.dw, fit.rho, [gap], s)[-1]

        t = time.perf_counter()
        with torch.no_grad():
            u = upsample(run_sol())
            u_coarse = upsample(run_coarse())
        inference = time.perf_counter() - t
        u_fine = run_fine()
        sol_cost = time_call(run_sol, repeats=2)
        fine_cost = time_call(run_fine, repeats=2)

        def rel(x):
            return float(np.linalg.norm(x - u_fine) / max(np.linalg.norm(u_fine), 1e-12))

        extra = dict(sol_error=rel(u), coarse_error=rel(u_coarse), sol_cost_seconds=sol_cost, fine_cost_seconds=fine_cost,
                     sol_macro_steps=n_macro, sol_error_metric="relative L2 error of the density vs the fine Numba solver",
                     training_target=trained.get("training_target"))
        return Forecast(dict(celldensity=u.astype(np.float32), **_observe(u, fit)), fit.parameters(), fit.seconds, inference, extra)


class SolverPrecomputed(SolverInLoop):
    name = "sol_precomputed"
    precomputed = True


FAMILIES = {f.name: f for f in (Persistence, Mechanistic, DataDriven, Residual, UDE, SolverInLoop, SolverPrecomputed,
                                Amortised, AmortisedResidual)}
