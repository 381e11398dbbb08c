"""The glioma model families (see ``neurohybrid.disorders.base.FAMILIES``).

Hybrids start from the calibrated mechanistic state at the last observed session (the mechanistic fit
reproduces the observed sessions) and differ in how they advance it to the forecast day:

* residual (APHYNITY, parallel): du/dt = f_FK(u; D_w, rho) + g_phi(u, c), g a small 3D CNN of the
  state and the covariates c = (WM, GM, CSF probability, distance to the ventricles) from the
  subject's own segmentation (``covariate_maps``), trained across subjects with loss = soft Dice +
  lambda * mean ||g||^2 (``hybrid.residual``).
* ude: the same equation with a pointwise MLP g(u, c) gated by u (1 - u) (``hybrid.neural_ode``),
  no penalty, torchdiffeq.
* sol / sol_precomputed (series): a 2x coarser grid (8 mm at the demo's 4 mm) advanced in macro steps
  of at most `sol_step_days`, each followed by a gated ``GridCorrection`` (a pointwise MLP of the
  state's stencil features, tissue, D_w and rho on their prior scale and the step, on the tumour
  front only); the last coarse state goes back onto the model grid by trilinear interpolation plus a
  learned gated correction. SOL-n unrolls n steps against the fine (Numba) solver's trajectories
  pooled onto the coarse grid, the pre-computed variant learns one-step targets
  (``hybrid.solver_in_loop``). Same network class, same data (``sol_trajectories``).
* amortised (series): a CNN maps the first session's masks + tissue to (D_w, rho); only t0 is fitted.
* amortised_residual (parallel-series): amortised parameters + the residual correction.
* data_driven: a CNN from the last masks, the covariates c and the time gap to the follow-up masks.

Radiotherapy (the subject's treatment table, ``treatment``): the mechanistic fit and every state it
gives (``mech.state_at``) include the fractions before that day; over the forecast gap each physics
family applies the fractions in its mechanistic part: the solver's LQ kill (mechanistic, amortised),
the same kill between the split steps (residual, amortised_residual) or between integration segments
(ude), on the coarse and fine steppers between sub-steps of a macro step (sol, sol_precomputed). Their
networks never see the treatment; data_driven and persistence ignore it (``treatment_extra`` says so).

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

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from neurohybrid.disorders import voxel
from neurohybrid.disorders.base import Forecast, SubjectData, shared_work
from neurohybrid.disorders.glioma import mechanistic as mech
from neurohybrid.disorders.glioma.inputs import cropped_target
from neurohybrid.disorders.glioma.treatment import Treatment
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


def treatment_extra(inputs: SubjectData, s: dict, used: bool) -> dict:
    """What the forecast's fit json says about the subject's radiotherapy (nothing if untreated)."""
    rt = Treatment.of(inputs, s)
    if not rt:
        return {}
    d_last, d_target = mech.forecast_days(inputs)
    out = {"treated": True, "fractions_before_last_session": len(rt.within(-math.inf, d_last)),
           "fractions_in_forecast_gap": len(rt.within(d_last, d_target))}
    if used:
        out.update(treatment_model="linear-quadratic kill in the mechanistic part", rt_alpha=rt.alpha,
                   rt_alpha_beta_gy=rt.alpha_beta_gy)
    else:
        out["treatment_model"] = "ignored: this family has no treatment input"
    return out


class GliomaFamily(VoxelFamily):
    settings = staticmethod(mech.settings)


class Persistence(GliomaFamily):
    name = "persistence"

    def forecast(self, inputs, trained):
        t = time.perf_counter()
        out = dict(t1gd=inputs.arrays["t1gd"][-1].astype(bool), flair=inputs.arrays["flair"][-1].astype(bool))
        return Forecast(out, {"carried_session": inputs.meta["sessions"][-1]}, 0.0, time.perf_counter() - t,
                        treatment_extra(inputs, self.s, used=False))


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
                        {"uncertainty": "spread of Nelder-Mead restarts reaching the best loss (log scale)",
                         **treatment_extra(inputs, self.s, used=True)})


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
        return Forecast(out, {"gap_days": gap}, 0.0, time.perf_counter() - t, treatment_extra(inputs, self.s, used=False))


# ---------------------------------------------------------------------------------------------
# parallel hybrids: residual (APHYNITY) and UDE, from the mechanistic state at the last session
# ---------------------------------------------------------------------------------------------

class _Case:
    """One subject prepared for a hybrid: tissue, covariates (``covariate_maps``), the mechanistic
    state at the last session, the gap; for training also the target masks and the patches."""

    def __init__(self, wm, gm, cov, u_last, gap, fit, spacing, target=None, regions=None, kills=None):
        self.wm, self.gm, self.cov, self.u_last, self.gap, self.fit, self.spacing = wm, gm, cov, u_last, gap, fit, spacing
        self.target, self.regions = target, regions or []
        # radiotherapy in the gap: [(days after the last session, surviving fraction per voxel)]
        self.kills = kills or []


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


def _stable_dt(wm, gm, spacing, fit, s) -> float:
    from neurohybrid.solvers.glioma import stable_dt

    dmax = float((fit.dw * np.asarray(wm, np.float32) + fit.dw * float(s["dg_ratio"]) * np.asarray(gm, np.float32)).max())
    return stable_dt(dmax, spacing, fit.rho, max_rho_dt=float(s["max_rho_dt"]))


def _step_plan(wm, gm, spacing, fit, gap, s) -> tuple[int, float]:
    """(n, h): the Numba solver's steps for this segment (same stable_dt, equal split of the segment)."""
    dt = _stable_dt(wm, gm, spacing, fit, s)
    n = max(1, math.ceil(gap / dt - 1e-9))
    return n, gap / n


def _segments(case, s) -> list[tuple]:
    """The solver's schedule of the gap with the radiotherapy fractions (``solvers.glioma._schedule``):
    ("steps", n, h) runs of Strang steps and ("fraction", n, None) kills; without fractions one run,
    the ``_step_plan`` of the whole gap."""
    from neurohybrid.solvers.glioma import _schedule

    if not case.kills:
        n, h = _step_plan(case.wm, case.gm, case.spacing, case.fit, case.gap, s)
        return [("steps", n, h)]
    return _schedule(case.gap, _stable_dt(case.wm, case.gm, case.spacing, case.fit, s), [], [d for d, _ in case.kills])


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
    kills = iter(case.kills)
    for kind, n, h in _segments(case, s):
        if kind == "fraction":  # the LQ kill of the mechanistic part
            for _ in range(n):
                u = u * torch.as_tensor(next(kills)[1], dtype=u.dtype, device=u.device)
            continue
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
    covariates = flat_covariates(*cov)
    try:
        if not case.kills:
            pred = model(u0, [case.gap], covariates=covariates, t0=0.0)[0, -1]
        else:  # integrate between the fractions, each an LQ kill of the state
            pred, t = u0, 0.0
            for day, factor in case.kills + [(case.gap, None)]:
                if day > t:
                    pred = model(pred, [day], covariates=covariates, t0=t)[:, -1]
                    t = day
                if factor is not None:
                    pred = pred * torch.as_tensor(factor, dtype=pred.dtype, device=pred.device).reshape(1, -1)
            pred = pred[0]
    finally:
        model.dynamics.correction = corr
    return pred.reshape(case.wm.shape).clamp(0.0, 1.0)


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
        wm = np.ascontiguousarray(a["wm"][box])
        kills = Treatment.of(inputs, self.s).kill_factors(d_last, d_target, wm.shape, box)
        return _Case(wm, np.ascontiguousarray(a["gm"][box]),
                     np.ascontiguousarray(covariate_maps(a, box)), np.ascontiguousarray(u_last[box]),
                     d_target - d_last, fit, _spacing(inputs), tgt, regions, kills)

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
        return Forecast(dict(celldensity=u, **_observe(u, fit)), params, fit.seconds, time.perf_counter() - t,
                        treatment_extra(inputs, self.s, used=True))


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
                             np.concatenate([a["flair"], tgt["flair"][None]]), days, _spacing(inputs), s,
                             treatment=Treatment.of(inputs, s))
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
                        fit.seconds + amortised_s, time.perf_counter() - t, treatment_extra(inputs, self.s, used=True))


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
#
# Set-up (measured on the demo's 4 mm crops, see sol_bench): the fine solver is the Numba solver on
# the model grid over the whole crop; the coarse solver is the same scheme on a 2x coarser grid
# (8 mm, 2x2x2 means of the tissue maps and the state) with its own stable step (4x longer where
# diffusion bounds it). It is advanced in macro steps of h <= sol_step_days, each followed by the
# learned correction (SOL); the final coarse state is brought back onto the model grid by trilinear
# interpolation masked by tissue plus a second, learned correction (the "upsampler"): a 2x coarser
# grid loses the sharp tumour front, and trilinear interpolation alone misses the fine solver's
# T1Gd mask by a Dice of 0.1-0.4 even from the exact coarse state. Both corrections are
# ``GridCorrection``s (pointwise MLPs of the state's stencil features and normalised covariates),
# gated by u (1 - u) and clamped to [0, 1], evaluated on the tumour front only.

SOL_SCALE = 0.1  # a unit network output changes u by 0.1 u (1 - u) * 4
N_SOL_COV = 5  # wm, gm, D_w and rho on the prior unit scale, h / sol_step_days
N_UP_COV = 4  # wm, gm (model grid), D_w and rho on the prior unit scale


def _pool(a: np.ndarray) -> np.ndarray:
    """2x2x2 means after padding to even sizes (edge values repeated): the coarse grid's values."""
    a = np.asarray(a, np.float32)
    if any(n % 2 for n in a.shape):
        a = np.pad(a, [(0, n % 2) for n in a.shape], mode="edge")
    return 0.125 * (a[0::2, 0::2, 0::2] + a[1::2, 0::2, 0::2] + a[0::2, 1::2, 0::2] + a[1::2, 1::2, 0::2]
                    + a[0::2, 0::2, 1::2] + a[1::2, 0::2, 1::2] + a[0::2, 1::2, 1::2] + a[1::2, 1::2, 1::2])


def _params_unit(dw, rho) -> tuple[float, float]:
    return float(mech.prior_unit(dw, mech.PRIOR_DW_RANGE)), float(mech.prior_unit(rho, mech.PRIOR_RHO_RANGE))


def _sol_covariates(wm_c, gm_c, dw, rho, h, s) -> np.ndarray:
    """(1, N, 5) covariates of the coarse step and its correction: wm, gm, D_w and rho on the prior
    unit scale (``mech.prior_unit``), the macro step over ``sol_step_days``."""
    n = wm_c.size
    zd, zr = _params_unit(dw, rho)
    const = np.array([zd, zr, h / float(s["sol_step_days"])], np.float32)
    return np.concatenate([wm_c.reshape(n, 1), gm_c.reshape(n, 1), np.broadcast_to(const, (n, 3))], 1).astype(np.float32)[None]


def _up_covariates(wm, gm, dw, rho) -> np.ndarray:
    n = wm.size
    zd, zr = _params_unit(dw, rho)
    const = np.array([zd, zr], np.float32)
    return np.concatenate([wm.reshape(n, 1), gm.reshape(n, 1), np.broadcast_to(const, (n, 2))], 1).astype(np.float32)[None]


class CoarseGliomaStep:
    """Advance the coarse grid (2x the voxel size) by each member's macro step h with the torch twin
    of the Numba solver (``strang_advance_torch``: the same Strang steps ``simulate_glioma`` takes
    over h, at the coarse grid's own ``stable_dt``), so the Numba ``GliomaStepper`` reproduces it at
    forecast time.

    u: (M, X, Y, Z); covariates (M or 1, N, 5) from ``_sol_covariates`` (per-member D_w, rho and h
    ride in them so that ``hybrid.solver_in_loop`` keeps them aligned with repeated members).
    """

    def __init__(self, spacing, s):
        self.spacing = tuple(2.0 * h for h in spacing)
        self.s = s

    def member_parameters(self, covariates, m):
        cov = covariates.expand(m, *covariates.shape[-2:])[:, 0]
        dw = mech.from_prior_unit(cov[:, 2].double(), mech.PRIOR_DW_RANGE)
        rho = mech.from_prior_unit(cov[:, 3].double(), mech.PRIOR_RHO_RANGE)
        h = cov[:, 4].double() * float(self.s["sol_step_days"])
        return dw, rho, h

    def __call__(self, u, covariates):
        from neurohybrid.solvers.glioma import glioma_coefficients_torch, stable_dt, strang_advance_torch

        m, shape = u.shape[0], tuple(u.shape[1:])
        cov = covariates.expand(m, *covariates.shape[-2:])
        wm, gm = cov[..., 0].reshape(m, *shape), cov[..., 1].reshape(m, *shape)
        dw, rho, h = self.member_parameters(covariates, m)
        dg = float(self.s["dg_ratio"])
        dmax = (wm + dg * gm).reshape(m, -1).amax(1).double() * dw
        dt = [stable_dt(float(d), self.spacing, float(r), max_rho_dt=float(self.s["sol_coarse_max_rho_dt"])) for d, r in zip(dmax, rho)]
        per = (m, 1, 1, 1)
        coeffs = glioma_coefficients_torch(wm, gm, self.spacing, dw.to(u.dtype).reshape(per), dg)
        return strang_advance_torch(u, coeffs, h.to(u.dtype).reshape(per), rho.to(u.dtype).reshape(per),
                                    torch.tensor(dt, dtype=u.dtype, device=u.device).reshape(per))


def _upsample_torch(uc: torch.Tensor, shape, tissue: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a coarse state (X, Y, Z) onto the model grid ``shape``, times tissue."""
    up = F.interpolate(uc[None, None], scale_factor=2, mode="trilinear", align_corners=False)[0, 0]
    return up[:shape[0], :shape[1], :shape[2]] * tissue


def _sol_draws(inputs, fit, s, seed) -> list[tuple[float, float, float]]:
    """(D_w, rho, h) of a training subject's trajectories: its calibrated (D_w, rho) (clipped to the
    prior ranges) first, then draws from the prior (``mech.draw_prior``); macro steps h uniform in
    [sol_step_days / 2, sol_step_days] (forecasts split their gap into such steps)."""
    import zlib

    rng = np.random.default_rng([int(seed), zlib.crc32(inputs.subject.encode())])
    h0 = float(s["sol_step_days"])
    out = []
    for k in range(int(s["sol_draws"])):
        if k == 0:
            dw, rho = float(np.clip(fit.dw, *mech.PRIOR_DW_RANGE)), float(np.clip(fit.rho, *mech.PRIOR_RHO_RANGE))
        else:
            dw, rho = mech.draw_prior(rng)
        out.append((dw, rho, float(rng.uniform(0.5 * h0, h0))))
    return out


def sol_trajectories(inputs, fit, s, seed: int = 0) -> dict:
    """A training subject's fine trajectories (done once per subject's inputs, ``inputs.shared``):
    for each (D_w, rho, h) of ``_sol_draws`` the Numba solver on the model grid over the whole crop,
    from the calibrated state at the last session, saved every h for ``sol_train_steps`` macro steps
    (the whole forecast horizon and beyond: 4-8 x sol_step_days)."""
    a = inputs.arrays

    def compute():
        d_last, _ = mech.forecast_days(inputs)
        u_last = mech.state_at(inputs, fit, [d_last], s)[0]
        k = int(s["sol_train_steps"])
        draws = _sol_draws(inputs, fit, s, seed)
        fine = []
        for dw, rho, h in draws:
            states = mech.simulate(a["wm"], a["gm"], u_last, _spacing(inputs), dw, rho, [h * (j + 1) for j in range(k)], s)
            fine.append(np.stack([u_last.astype(np.float32)] + [np.asarray(x, np.float32) for x in states]))
        return {"draws": draws, "fine": np.stack(fine)}  # (D, K+1, X, Y, Z) on the model grid

    return inputs.shared.get("glioma.sol_trajectories", (s, dataclasses.asdict(fit), int(seed)), compute)


def _common_shape(shapes):
    return tuple(max(sh[i] for sh in shapes) for i in range(3))


def _pad_to(a: np.ndarray, shape) -> np.ndarray:
    return np.pad(a, [(0, 0)] * (a.ndim - 3) + [(0, n - m) for n, m in zip(shape, a.shape[-3:])])


class SolverInLoop(GliomaFamily):
    """Solver in the loop (series): a 2x coarser grid advanced in macro steps, each corrected by a
    ``GridCorrection`` (SOL-n, ``sol_steps`` unrolled differentiable coarse steps against the fine
    trajectory pooled onto the coarse grid; ``sol_precomputed``: the same network on one-step
    targets), then brought back onto the model grid by trilinear interpolation plus a learned,
    gated correction (trained on the fine states themselves, shared by sol and sol_precomputed).
    Training data: ``sol_trajectories`` (several parameter draws per training subject over the
    whole crop and horizon), mini-batches, held-out draws for validation and the fall-back to the
    plain coarse solver (``use_correction`` in the checkpoint and the forecast's extra)."""

    name = "sol"
    trains_across_subjects = True
    precomputed = False

    def model(self, spacing):
        from neurohybrid.hybrid.solver_in_loop import CorrectedSolver

        corr = GridCorrection(N_SOL_COV, int(self.s["sol_hidden"]), scale=SOL_SCALE,
                              active_eps=float(self.s["sol_active_eps"])).to(self.device)
        return CorrectedSolver(CoarseGliomaStep(spacing, self.s), corr)

    def upsampler(self):
        return GridCorrection(N_UP_COV, int(self.s["sol_up_hidden"]), scale=SOL_SCALE,
                             active_eps=float(self.s["sol_active_eps"])).to(self.device)

    def training_data(self, pairs):
        """Fine trajectories (B, K+1, coarse grid) pooled onto the coarse grid, the coarse step's
        covariates (B, N, 5), the model-grid trajectories with their tissue maps and draws (for the
        upsampler), and the voxel size."""
        s = self.s
        subjects = []
        for inputs, _ in pairs:
            fit = mech.calibrate_inputs(inputs, s, seed=self.seed)
            subjects.append((inputs, sol_trajectories(inputs, fit, s, self.seed)))
        spacings = [_spacing(inputs) for inputs, _ in subjects]
        if any(np.abs(np.subtract(sp, spacings[0])).max() > 1e-6 for sp in spacings):
            raise InputError("training subjects have different voxel sizes: SOL needs one grid")
        # each subject's training grid: the box its trajectories reach (coarse state > 1e-7 at any
        # saved step, padded by 2 coarse voxels; outside it u stays ~0, so the crop's no-flux edge
        # changes nothing), which keeps training cost proportional to the tumour, not the brain
        crops = []
        for inputs, traj in subjects:
            a = inputs.arrays
            pooled = np.stack([np.stack([_pool(u) for u in states]) for states in traj["fine"]])
            box = _active_box(pooled.max(axis=(0, 1)), SolForecaster.EPS, 2, upper=False)
            if box is None:
                box = (slice(None),) * 3
            cbox = tuple(slice(b.start or 0, b.stop if b.stop is not None else n) for b, n in zip(box, pooled.shape[2:]))
            fbox = tuple(slice(2 * b.start, min(2 * b.stop, n)) for b, n in zip(cbox, a["wm"].shape))
            crops.append((pooled[(slice(None), slice(None)) + cbox], _pool(a["wm"])[cbox], _pool(a["gm"])[cbox], fbox, traj))
        coarse_shape = _common_shape([c[1].shape for c in crops])
        fines, covs, fine_grid = [], [], []
        for (inputs, _), (pooled, wm_c, gm_c, fbox, traj) in zip(subjects, crops):
            a = inputs.arrays
            wm_c, gm_c = _pad_to(wm_c, coarse_shape), _pad_to(gm_c, coarse_shape)
            for (dw, rho, h), states in zip(traj["draws"], pooled):
                fines.append(_pad_to(states, coarse_shape))
                covs.append(_sol_covariates(wm_c, gm_c, dw, rho, h, s)[0])
            sl = (slice(None), slice(None)) + fbox
            fine_grid.append((a["wm"][fbox], a["gm"][fbox], dict(traj, fine=traj["fine"][sl])))
        return self.tensor(np.stack(fines)), self.tensor(np.stack(covs)), fine_grid, spacings[0]

    def train(self, pairs):
        fine, cov, fine_grid, spacing = self.training_data(pairs)
        model = self.model(spacing)
        model.correction.set_shape(fine.shape[2:])
        kw = dict(self.train_kw(), epochs=int(self.s["sol_epochs"]), batch_size=int(self.s["sol_batch_size"]), patience=None)
        out = train_corrected_solver(model, fine, cov, self.s, kw, precomputed=self.precomputed)
        up = shared_work(pairs).get("glioma.sol_upsampler", (self.s, self.train_kw(), str(self.device)),
                                    lambda: train_upsampler(self, fine_grid), seed=self.seed)
        return dict(out, upsampler=up)

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        s = self.s
        fit = mech.calibrate_inputs(inputs, s, seed=self.seed)
        d_last, d_target = mech.forecast_days(inputs)
        u_last = mech.state_at(inputs, fit, [d_last], s)[0]
        kills = Treatment.of(inputs, s).kill_factors(d_last, d_target, inputs.arrays["wm"].shape)
        runner = SolForecaster(self, inputs.arrays, _spacing(inputs), fit.dw, fit.rho, d_target - d_last, trained, kills)
        t = time.perf_counter()
        u = runner.sol(u_last)
        inference = time.perf_counter() - t
        u_coarse = runner.coarse(u_last)
        u_fine = runner.fine(u_last)
        costs = runner.costs(u_last, repeats=2)
        thr = (fit.theta_t1gd, min(fit.theta_flair, fit.theta_t1gd))
        extra = dict(sol_error_vs_fine=relative_error(u, u_fine), coarse_error_vs_fine=relative_error(u_coarse, u_fine),
                     fine_cost_seconds=costs["fine"], coarse_cost_seconds=costs["coarse"], sol_cost_seconds=costs["sol"],
                     use_correction=bool(trained.get("use_correction", True)),
                     upsampler_learned=bool(trained["upsampler"].get("use_learned", True)),
                     sol_error_metric=SOL_ERROR_METRIC, sol_macro_steps=runner.n_macro,
                     **mask_dice(u, u_fine, *thr, prefix="sol"), **mask_dice(u_coarse, u_fine, *thr, prefix="coarse"),
                     training_target=trained.get("training_target"), **treatment_extra(inputs, s, used=True))
        return Forecast(dict(celldensity=u.astype(np.float32), **_observe(u, fit)), fit.parameters(), fit.seconds, inference, extra)


SOL_ERROR_METRIC = ("relative L2 error ||u - u_fine|| / ||u_fine|| of the tumour density on the model grid over the whole "
                    "crop at the forecast day, u_fine from the fine (Numba, model-grid) solver with the same parameters "
                    "and start state; dice_* compare the T1Gd/FLAIR threshold masks")


def relative_error(u, u_fine) -> float:
    return float(np.linalg.norm(np.asarray(u, np.float64) - u_fine) / max(float(np.linalg.norm(u_fine)), 1e-12))


def mask_dice(u, u_fine, theta_t1gd, theta_flair, prefix) -> dict:
    from neurohybrid.evaluation.metrics import dice

    return {f"{prefix}_dice_t1gd": float(dice(u >= theta_t1gd, u_fine >= theta_t1gd)),
            f"{prefix}_dice_flair": float(dice(u >= theta_flair, u_fine >= theta_flair))}


def _upsampler_data(family, fine_grid, max_states: int = 4):
    """Per model-grid state (a few per trajectory, spread over the horizon): the stencil features and
    covariates of the trilinear upsampling of its pooled state on its active voxels, that state,
    and the fine target there."""
    from neurohybrid.disorders.networks import stencil_features

    items = []
    for wm, gm, traj in fine_grid:
        tissue = family.tensor((wm + gm) > 0)
        for (dw, rho, _), states in zip(traj["draws"], traj["fine"]):
            cov = family.tensor(_up_covariates(wm, gm, dw, rho))[0]
            ks = np.unique(np.linspace(1, len(states) - 1, min(max_states, len(states) - 1)).round().astype(int))
            for k in ks:
                up = _upsample_torch(family.tensor(_pool(states[k])), wm.shape, tissue)
                eps = family.upsampler().active_eps
                act = ((up > eps) & (up < 1 - eps) & (tissue > 0)).reshape(-1)
                x = torch.cat([stencil_features(up[None]).reshape(-1, 3), cov], 1)[act]
                items.append((x, up.reshape(-1)[act], family.tensor(states[k]).reshape(-1)[act]))
    return items


def train_upsampler(family, fine_grid) -> dict:
    """Train the learned part of the coarse-to-fine upsampling: u = clamp(up + 4 up (1 - up) g, 0, 1)
    with up the trilinear interpolation of the pooled fine state, g a ``GridCorrection``, against the
    fine state (mean squared error over the active voxels, mini-batches of states, a quarter of
    the states held out). Switched off (``use_learned`` False) when it does not lower the held-out
    error. Same for sol and sol_precomputed (a fold's shared work)."""
    from neurohybrid.hybrid.solver_in_loop import logistic_gate
    from neurohybrid.hybrid.training import train_loop

    net = family.upsampler()
    items = _upsampler_data(family, fine_grid)

    def pred(i):
        x, up, _ = items[i]
        return torch.clamp(up + logistic_gate(up) * net.scale * net.mlp(x)[:, 0], 0.0, 1.0)

    def loss_fn(idx):
        return sum(((pred(i) - items[i][2]) ** 2).mean() for i in idx) / len(idx)

    n_steps = int(family.s["sol_upsample_steps"])
    batch = 4
    per_epoch = max(1, math.ceil(len(items) * 0.75 / batch))
    kw = dict(family.train_kw(), epochs=max(1, n_steps // per_epoch), batch_size=batch, val_fraction=0.25, patience=None, lr=3e-3)
    result = train_loop(net, loss_fn, len(items), **kw)
    idx = result.val_indices or result.train_indices
    with torch.no_grad():
        learned = sum(float(((pred(i) - items[i][2]) ** 2).sum()) for i in idx)
        plain = sum(float(((items[i][1] - items[i][2]) ** 2).sum()) for i in idx)
    return {"state_dict": net.state_dict(), "use_learned": learned < plain, "history": result.history,
            "val_history": result.val_history, "train_seconds": result.seconds,
            "validation": {"learned_sq_error": learned, "trilinear_sq_error": plain, "states": len(idx)}}


class SolForecaster:
    """One subject's forecast by the fine solver, the plain coarse set-up and the corrected one,
    prepared once per subject (maps, steppers, buffers, weights: not timed), then run per call.

    fine: the Numba ``GliomaStepper`` on the model grid cropped to the tissue's bounding box, one
    advance over the gap (step for step ``simulate_glioma``; ``fine_simulate`` is that call itself,
    with its own per-call set-up). coarse: the Numba stepper on the 2x coarser grid (cropped to its
    tissue box) in n macro steps (h = gap / n <= sol_step_days), trilinear interpolation back,
    masked by tissue. sol: the same, each macro step followed by the trained correction and the
    interpolation followed by the learned upsampling, both evaluated by Numba loops with the
    trained weights (``sol_numba``). ``sol_torch`` / ``coarse_torch`` are the same forecast with the
    torch modules (the reference the Numba path is tested against). The interpolation covers the
    box where the coarse state exceeds ``BOX_EPS`` = 1e-3, padded by one coarse voxel (elsewhere
    the model-grid state is set to 0: a density a thousand times below the imaging thresholds;
    measured at 2 mm: the relative error against the fine solver unchanged to 4 digits, the
    interpolation's box half the size of the 1e-7 box).  ``EPS`` bounds the coarse start state and
    the training crops."""

    EPS = 1e-7
    BOX_EPS = 1e-3

    def __init__(self, family, arrays, spacing, dw, rho, gap, trained, kills=None):
        from neurohybrid.disorders.glioma import sol_numba
        from neurohybrid.solvers.glioma import GliomaStepper, _bbox, _pad1

        self.f, self.s = family, family.s
        self.a, self.spacing, self.dw, self.rho, self.gap = arrays, spacing, float(dw), float(rho), float(gap)
        self.n_macro = max(1, math.ceil(self.gap / float(self.s["sol_step_days"]) - 1e-9))
        self.h = self.gap / self.n_macro
        self.trained = trained
        # radiotherapy in the gap: [(day after the start, surviving fraction on the model grid)], applied
        # to each stepper's state at its day (a macro step is cut there; the correction still follows
        # each whole macro step); on the coarse grid the 2x2x2 mean of the surviving fraction
        self.kills = list(kills or [])
        self.model = family.model(spacing)
        self.model.correction.load_state_dict(trained["state_dict"])
        self.model.use_correction = bool(trained.get("use_correction", True))
        self.up = family.upsampler()
        self.up.load_state_dict(trained["upsampler"]["state_dict"])
        self.up_learned = bool(trained["upsampler"].get("use_learned", True))
        s, threads, dg = self.s, int(self.s["threads"]), float(self.s["dg_ratio"])
        # the coarse grid's tissue maps (made once per subject like the model grid's)
        self.wm_c, self.gm_c = _pool(arrays["wm"]), _pool(arrays["gm"])
        # Numba path: the coarse stepper on the coarse tissue box, its padded maps and scratch
        tissue_c = (self.wm_c + self.gm_c) > 0
        # (padded by one coarse voxel: the interpolation box may reach one voxel beyond tissue, as on the full grid)
        cbox = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(_bbox(tissue_c), tissue_c.shape))
        self.c_off = tuple(int(b.start) for b in cbox)
        self.tissue_cb = np.ascontiguousarray(tissue_c[cbox])
        wm_cb, gm_cb = np.ascontiguousarray(self.wm_c[cbox]), np.ascontiguousarray(self.gm_c[cbox])
        self.stepper = GliomaStepper(wm_cb, gm_cb, np.zeros_like(wm_cb), spacing=tuple(2 * h for h in spacing), dw=self.dw,
                                     rho=self.rho, dg_ratio=dg, max_rho_dt=float(s["sol_coarse_max_rho_dt"]), threads=threads)
        self.wm_cp, self.gm_cp = _pad1(wm_cb), _pad1(gm_cb)
        self.scratch_c = np.zeros_like(self.wm_cp)
        self.wm_f = np.ascontiguousarray(arrays["wm"], np.float32)
        self.gm_f = np.ascontiguousarray(arrays["gm"], np.float32)
        self.tissue_f = ((self.wm_f + self.gm_f) > 0).astype(np.float32)
        self.scratch_f = np.zeros(tuple(n + 2 for n in self.wm_f.shape), np.float32)
        self.w_sol = sol_numba.mlp_weights(self.model.correction)
        self.w_up = sol_numba.mlp_weights(self.up)
        self.work = sol_numba.Scratch(self.w_sol[0].shape[0], int(s["sol_hidden"]))
        self.work_up = sol_numba.Scratch(self.w_up[0].shape[0], int(s["sol_up_hidden"]))
        zd, zr = _params_unit(self.dw, self.rho)
        self.consts_sol = np.array([zd, zr, self.h / float(s["sol_step_days"])], np.float32)
        self.consts_up = np.array([zd, zr], np.float32)
        # the fine solver prepared the same way: Numba stepper on the model grid's tissue box
        self.fbox = _bbox((self.wm_f + self.gm_f) > 0)
        self.fine_stepper = GliomaStepper(self.wm_f[self.fbox], self.gm_f[self.fbox], np.zeros_like(self.wm_f[self.fbox]),
                                          spacing=spacing, dw=self.dw, rho=self.rho, dg_ratio=dg,
                                          max_rho_dt=float(s["max_rho_dt"]), threads=threads)

    def _advance(self, stepper, t_a, t_b, kills):
        """stepper.advance over (t_a, t_b], killing at each fraction day there (kills on its grid)."""
        t = t_a
        for day, factor in kills:
            if t_a < day <= t_b:
                stepper.advance(day - t)
                stepper.state[...] *= factor
                t = day
        stepper.advance(t_b - t)

    # -- fine (reference) -----------------------------------------------------------------------
    def fine(self, u_last):
        st = self.fine_stepper
        st.load(u_last[self.fbox])
        self._advance(st, 0.0, self.gap, [(d, f[self.fbox]) for d, f in self.kills])
        out = np.zeros(self.wm_f.shape, np.float32)
        out[self.fbox] = st.state
        return out

    def fine_simulate(self, u_last):
        if self.kills:  # the solver call with its own set-up is the untreated reference cost only
            return self.fine(u_last)
        return mech.simulate(self.a["wm"], self.a["gm"], u_last, self.spacing, self.dw, self.rho, [self.gap], self.s)[-1]

    # -- coarse and corrected coarse (Numba) ----------------------------------------------------
    def _run(self, u_last, corrected: bool) -> np.ndarray:
        from neurohybrid.disorders.glioma import sol_numba

        st = self.stepper
        u_last = np.ascontiguousarray(u_last, np.float32)
        sol_numba.pool_into(u_last, st._a, self.tissue_cb, *self.c_off)
        correct = corrected and self.model.use_correction
        scale = np.float32(self.model.correction.scale)
        eps = np.float32(self.model.correction.active_eps)
        cbox = tuple(slice(o, o + n) for o, n in zip(self.c_off, self.tissue_cb.shape))
        kills = [(d, _pool(f)[cbox]) for d, f in self.kills]
        for m in range(self.n_macro):
            if kills:
                self._advance(st, m * self.h, (m + 1) * self.h, kills)
            else:
                st.advance(self.h)
            if correct:
                sol_numba.correct_front(st._a, self.scratch_c, self.wm_cp, self.gm_cp, self.consts_sol, *self.w_sol, scale, eps, *self.work.args())
        out = np.zeros(self.wm_f.shape, np.float32)
        sol_numba.upsample_front(st._a, *self.c_off, self.wm_f, self.gm_f, self.tissue_f, self.scratch_f, out, bool(corrected and self.up_learned),
                                 self.consts_up, *self.w_up, np.float32(self.up.scale), np.float32(self.up.active_eps),
                                 np.float32(self.BOX_EPS), *self.work_up.args())
        return out

    def sol(self, u_last):
        return self._run(u_last, True)

    def coarse(self, u_last):
        return self._run(u_last, False)

    # -- the same with the torch modules (reference of the Numba path) --------------------------
    def _run_torch(self, u_last, corrected: bool) -> np.ndarray:
        from neurohybrid.hybrid.solver_in_loop import logistic_gate
        from neurohybrid.solvers.glioma import GliomaStepper

        wm_c, gm_c = self.wm_c, self.gm_c
        stepper = GliomaStepper(wm_c, gm_c, np.zeros_like(wm_c), spacing=tuple(2 * h for h in self.spacing), dw=self.dw,
                                rho=self.rho, dg_ratio=float(self.s["dg_ratio"]),
                                max_rho_dt=float(self.s["sol_coarse_max_rho_dt"]), threads=int(self.s["threads"]))
        stepper.load(_pool_state(u_last, wm_c.shape, self.EPS))
        kills = [(d, _pool(f)) for d, f in self.kills]
        correct = corrected and self.model.use_correction
        if correct:
            cov_grid = _sol_covariates(wm_c, gm_c, self.dw, self.rho, self.h, self.s)[0].reshape(*wm_c.shape, N_SOL_COV)
        with torch.no_grad():
            for m in range(self.n_macro):
                if kills:
                    self._advance(stepper, m * self.h, (m + 1) * self.h, kills)
                else:
                    stepper.advance(self.h)
                if correct:
                    u = stepper.state
                    box = _active_box(u, self.EPS, 1)
                    if box is None:
                        continue
                    ub = self.f.tensor(u[box])
                    cov = self.f.tensor(cov_grid[box]).reshape(1, -1, N_SOL_COV)
                    self.model.correction.set_shape(ub.shape)
                    u[box] = self.model.correct(ub[None], cov)[0].cpu().numpy()
            uc = stepper.state
            shape = self.a["wm"].shape
            out = np.zeros(shape, np.float32)
            cbox = _active_box(uc, self.BOX_EPS, 1, upper=False)
            if cbox is None:
                return out
            fbox = tuple(slice(2 * b.start, min(2 * b.stop, n)) for b, n in zip(cbox, shape))
            wm, gm = self.a["wm"][fbox], self.a["gm"][fbox]
            tissue = self.f.tensor((wm + gm) > 0)
            up = _upsample_torch(self.f.tensor(uc[cbox]), tissue.shape, tissue)
            if corrected and self.up_learned:
                cov = self.f.tensor(_up_covariates(wm, gm, self.dw, self.rho))
                self.up.set_shape(up.shape)
                g = self.up(up[None], cov)[0]
                up = torch.clamp(up + logistic_gate(up) * g, 0.0, 1.0) * tissue
            out[fbox] = up.cpu().numpy()
        return out

    def sol_torch(self, u_last):
        return self._run_torch(u_last, True)

    def coarse_torch(self, u_last):
        return self._run_torch(u_last, False)

    def costs(self, u_last, repeats: int = 5) -> dict:
        """Best-of-``repeats`` wall times (seconds) from u_last, same threads, compilation excluded (one
        warm-up call each): the prepared fine stepper (``fine``), the fine solver call with its own
        set-up (``fine_simulate``), coarse and sol (prepared the same way as ``fine``)."""
        from neurohybrid.hybrid.solver_in_loop import time_call

        calls = {"fine": self.fine, "fine_simulate": self.fine_simulate, "coarse": self.coarse, "sol": self.sol}
        for fn in calls.values():
            fn(u_last)
        return {k: time_call(lambda fn=fn: fn(u_last), repeats) for k, fn in calls.items()}


def _pool_state(u: np.ndarray, coarse_shape, eps: float) -> np.ndarray:
    """``_pool`` of a state, computed on the (even-aligned) bounding box of u > eps only; the coarse
    state is 0 elsewhere (there the exact means are below eps)."""
    out = np.zeros(coarse_shape, np.float32)
    box = _active_box(u, eps, 0, upper=False)
    if box is None:
        return out
    fine = tuple(slice(b.start - b.start % 2, b.stop + b.stop % 2) for b in box)
    coarse = tuple(slice(f.start // 2, (f.start + 1) // 2 + (min(f.stop, n) - f.start + 1) // 2) for f, n in zip(fine, u.shape))
    out[coarse] = _pool(u[fine])
    return out


def _active_box(u: np.ndarray, eps: float, pad: int, upper: bool = True):
    """Bounding box (slices) of the voxels with eps < u (< 1 - eps when ``upper``), padded by ``pad``."""
    mask = u > eps
    if upper:
        mask &= u < 1.0 - eps
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(i for i in range(3) if i != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, u.shape[axis])))
    return tuple(out)


class SolverPrecomputed(SolverInLoop):
    name = "sol_precomputed"
    precomputed = True


FAMILIES = {f.name: f for f in (Persistence, Mechanistic, DataDriven, Residual, UDE, SolverInLoop, SolverPrecomputed,
                                Amortised, AmortisedResidual)}
