"""The stroke model families (see ``neurohybrid.disorders.base.FAMILIES``).

The mechanistic core is the per-voxel Xue 2021 model with a per-subject sensitivity sigma
(``stroke.mechanistic``). When the acute core is empty or tiny sigma is not identified by the acute
session: it comes from a population prior learned on the fold's training subjects (``mechanistic``,
``residual``, ``ude``, ``sol``, ``sol_precomputed`` keep it in their checkpoint as ``sigma_prior``)
and the fit json says ``sigma_identified: false``.

Every family forecasts from the acute session only. The tissue-death model is per voxel, so the
observed state at the imaging time (the acute core dead) enters as "dead tissue stays dead": the
forecast infarct of every family contains the acute core, and its dead fraction is 1 there.

What the corrections see (``features``, all from the subject's own acute data): CBF, its deficit
relative to the tissue's normal flow, WM / GM, the acute core, the depth inside the hypoperfused
region (tissue with CBF below ``hypoperfusion_ratio`` of normal) and the distance to the acute core
(to the most hypoperfused tissue when the core is empty), and the times (imaging, reperfusion or
follow-up, reperfused or not, follow-up). These are what a stroke scientist would look at for
collateral supply: tissue near the rim of the hypoperfused territory, imaged early, recovers flow.

Hybrids:

* residual (APHYNITY, parallel): the model is driven by CBF / sigma + c_phi(x), c a small 3D CNN of
  the features. Loss = soft Dice at follow-up + lambda * mean c^2; c = 0 is the mechanistic model.
* ude: the Xue rates modulated by a pointwise MLP of (H, per-voxel features): death rate x (1 + g_D),
  toxic production x (1 + g_T), g in (-1, 1) (``RateCorrection``). The network sees the voxel's
  covariates, not its state (D, T): that keeps training at one Numba RK4 solve with exact
  derivatives per step (``death_grad``); backpropagating a state-dependent MLP through the 480
  torch RK4 steps of 120 h cost ~8 s per optimiser step on one core.
* sol / sol_precomputed (series, accelerated mechanistic models; ``stroke.sol``): a large-step
  (at most ``sol_step_hours`` = 24 h, the step length an input) linearly implicit solver (backward
  Euler for the living fraction, ``sol_coarse_scheme``; ~7% error of D alone) whose state
  [D, A = T (1 - D), start-of-step D0, A0] a pointwise MLP corrects after each step (gated: zero
  without hypoperfusion or toxin and in dead tissue; clamped to D in [0, 1], A in [0, T_MAX]);
  SOL-n unrolls n steps against the fine Numba solver (RK4, ``fine_dt_s``), the pre-computed
  variant learns one-step targets. Same network, same data: fine trajectories over the whole
  horizon, ``sol_draws`` sigma draws per training subject, reperfusion times drawn. Validated on
  held-out draws by D at the horizon; falls back to the plain coarse solver (``use_correction``).
* amortised (series): a CNN maps CBF, tissue, core and times to sigma; the solver forecasts.
* amortised_residual (parallel-series): amortised sigma + the residual CBF correction.
* data_driven: a CNN from the features to the final infarct.

Training of residual / amortised_residual / ude (``train_voxel_items``): every training subject's
candidate voxels are shuffled (seeded) and cut into ``voxel_chunks`` chunks; the chunks are the
items of ``hybrid.training.train_loop``: mini-batches of ``batch_size`` chunks, ``val_fraction`` of
the chunks held out for early stopping (``patience``), the best epoch restored. One batched RK4
unroll serves all the chunks of a step (``xue_unroll``: per-voxel reperfusion and follow-up times).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from neurohybrid.disorders import voxel
from neurohybrid.disorders.base import Forecast, shared_work
from neurohybrid.disorders.networks import ParamNet, TinyCNN, soft_dice_loss
from neurohybrid.disorders.stroke import mechanistic as mech
from neurohybrid.disorders.stroke import sol
from neurohybrid.disorders.stroke.sol import CoarseXueStep, SolCorrection  # noqa: F401  (the SOL pieces, re-exported)
from neurohybrid.disorders.stroke.inputs import cropped_target
from neurohybrid.disorders.voxel_family import (VoxelFamily, check_trained, train_corrected_solver, train_mask_cnn,
                                                train_param_net)
from neurohybrid.errors import InputError
from neurohybrid.solvers.stroke import CORE_THRESHOLD

HOURS = 24.0  # time features in days
CBF_SCALE = 60.0
DIST_SCALE_MM = 20.0
N_FEATURES = 11  # channels of ``features``
N_VOXEL_COVARIATES = 6  # per-voxel covariates of the UDE correction (besides D, T)
UDE_EPOCH_FACTOR = 20  # the UDE trains UDE_EPOCH_FACTOR x epochs (cheap epochs; see UDE.train)
RESIDUAL_SCALE = 10.0  # ml/100 ml/min per unit output of the residual CNN (the APHYNITY penalty is on the output)


def _rep(m) -> float | None:
    r = m["reperfusion_h"]
    return None if r is None or r >= float(m["hours_followup"]) else float(r)


class StrokeFamily(VoxelFamily):
    settings = staticmethod(mech.settings)

    def calibrate(self, inputs, prior=None):
        return mech.calibrate(inputs, self.s, prior=prior)

    @staticmethod
    def prior_of(trained) -> dict | None:
        """The fold's sigma prior kept in a checkpoint (None: the default prior)."""
        return (trained or {}).get("sigma_prior")

    def outputs(self, dead, inputs) -> dict:
        """Forecast outputs from the dead fraction: dead tissue stays dead (the acute core, observed
        at the imaging time, is dead at follow-up whatever the model says)."""
        core = inputs.arrays["core"].astype(bool)
        dead = np.where(core, 1.0, np.asarray(dead, np.float32)).astype(np.float32)
        return dict(infarct=mech.infarct_from_dead(dead, core), dead=dead)


class Persistence(StrokeFamily):
    name = "persistence"

    def forecast(self, inputs, trained):
        t = time.perf_counter()
        core = inputs.arrays["core"].astype(bool)
        return Forecast(dict(infarct=core, dead=core.astype(np.float32)), {}, 0.0, time.perf_counter() - t)


class Mechanistic(StrokeFamily):
    """Per-subject sigma from the acute core; the fold's prior of sigma (its cross-subject component,
    ``train``) when the core is empty or tiny."""

    name = "mechanistic"
    trains_across_subjects = True

    def train(self, pairs):
        start = time.perf_counter()
        prior = mech.sigma_prior(pairs, self.s)
        return {"sigma_prior": prior, "settings": self.s, "history": [], "val_history": [],
                "prior_seconds": time.perf_counter() - start}

    def forecast(self, inputs, trained):
        fit = self.calibrate(inputs, self.prior_of(trained))
        t = time.perf_counter()
        dead = mech.forecast_dead(inputs, fit, self.s)
        return Forecast(self.outputs(dead, inputs), fit.parameters(), fit.seconds, time.perf_counter() - t,
                        {"uncertainty": "profile interval of sigma (loss within 5% + 0.005 of the minimum, 2% steps); "
                                        "prior spread clipped to the feasible range when sigma is unidentified",
                         **fit.diagnostics()})


# ---------------------------------------------------------------------------------------------
# features the corrections and the data-driven model see (the subject's own acute data)
# ---------------------------------------------------------------------------------------------

def _image(inputs, box, with_times=True) -> np.ndarray:
    """CBF, WM, GM, core (+ 3 time channels): the amortised parameter network's input."""
    a, m = inputs.arrays, inputs.meta
    chans = [a["cbf"][box] / CBF_SCALE, a["wm"][box], a["gm"][box], a["core"][box].astype(np.float32)]
    if with_times:
        rep = _rep(m)
        follow = float(m["hours_followup"])
        shape = chans[0].shape
        chans += [np.full(shape, follow / HOURS), np.full(shape, (rep if rep is not None else follow) / HOURS),
                  np.full(shape, 1.0 if rep is not None else 0.0)]
    return np.stack(chans).astype(np.float32)


def feature_maps(inputs, s) -> dict:
    """Covariate maps on the inputs' (cropped) grid, from the acute session only (computed once per
    subject's inputs, ``inputs.shared``)."""
    return inputs.shared.get("stroke.feature_maps", s, lambda: _feature_maps(inputs, s))


def _feature_maps(inputs, s) -> dict:
    from scipy import ndimage

    from neurohybrid.solvers.stroke import normal_cbf

    a, m = inputs.arrays, inputs.meta
    vox = tuple(float(v) for v in m.get("voxel_mm", (1.0, 1.0, 1.0)))
    wm = np.clip(a["wm"], 0, 1)
    tissue = (a["wm"] + a["gm"]) >= float(s["tissue_min"])
    # CBF smoothed over tissue only (normalised convolution, ~1 voxel): noise and CSF partial volume
    # do not punch holes in the hypoperfused region
    w = tissue.astype(np.float64)
    num = ndimage.gaussian_filter(a["cbf"] * w, 1.0)
    den = ndimage.gaussian_filter(w, 1.0)
    smooth = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    normal = normal_cbf(wm)
    ratio = np.where(tissue, smooth / np.maximum(normal, 1e-3), 1.0)
    deficit = np.clip(1.0 - a["cbf"] / np.maximum(normal, 1e-3), -1.0, 1.0) * tissue
    hypo = tissue & (ratio < float(s["hypoperfusion_ratio"]))
    depth = ndimage.distance_transform_edt(hypo, sampling=vox) if hypo.any() else np.zeros(hypo.shape)
    core = a["core"].astype(bool)
    severe = tissue & (ratio < 0.5 * float(s["hypoperfusion_ratio"]))
    ref = core if core.any() else severe if severe.any() else hypo
    dist = ndimage.distance_transform_edt(~ref, sampling=vox) if ref.any() else np.full(core.shape, 3 * DIST_SCALE_MM)
    rep = _rep(m)
    follow = float(m["hours_followup"])
    times = dict(t_imaging=float(m["hours_acute"]) / HOURS, t_reperfusion=(rep if rep is not None else follow) / HOURS,
                 reperfused=1.0 if rep is not None else 0.0, t_followup=follow / HOURS)
    return dict(cbf=(a["cbf"] / CBF_SCALE).astype(np.float32), wm=a["wm"].astype(np.float32), gm=a["gm"].astype(np.float32),
                core=core.astype(np.float32), deficit=deficit.astype(np.float32),
                depth=np.clip(depth / DIST_SCALE_MM, 0, 3).astype(np.float32),
                dist=np.clip(dist / DIST_SCALE_MM, 0, 3).astype(np.float32), times=times)


def features(inputs, s, box) -> np.ndarray:
    """(N_FEATURES, *box) float32: cbf, wm, gm, core, deficit, depth, distance, and 4 time channels."""
    f = feature_maps(inputs, s)
    chans = [f[k][box] for k in ("cbf", "wm", "gm", "core", "deficit", "depth", "dist")]
    shape = chans[0].shape
    chans += [np.full(shape, v, np.float32) for v in f["times"].values()]
    return np.stack(chans).astype(np.float32)


def _box(inputs, s, extra=None):
    masks = [mech.candidates(inputs, s)] + ([extra] if extra is not None else [])
    return voxel.tumour_box(masks, inputs.arrays["cbf"].shape, int(s["train_margin"]))


# ---------------------------------------------------------------------------------------------
# data-driven
# ---------------------------------------------------------------------------------------------

def _prior_logits(core):
    """"No change" logits the data-driven CNN adds to: +3 in the acute core, -6 elsewhere (a
    background probability of 0.25%: at -3 the 5% over a whole box swamped the soft Dice)."""
    return np.where(core > 0.5, 3.0, -6.0).astype(np.float32)


class DataDriven(StrokeFamily):
    name = "data_driven"
    trains_across_subjects = True

    def net(self):
        return TinyCNN(N_FEATURES, 1, int(self.s["hidden"]), 3, zero_init=True).to(self.device)

    def train(self, pairs):
        items = []
        for inputs, target in pairs:
            tgt = cropped_target(inputs, target)
            box = _box(inputs, self.s, tgt)
            core = inputs.arrays["core"][box].astype(np.float32)
            items.append((self.tensor(features(inputs, self.s, box))[None], self.tensor(_prior_logits(core))[None, None],
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
            p = torch.sigmoid(net(self.tensor(features(inputs, self.s, full))[None])
                              + self.tensor(_prior_logits(core))[None, None])
        p = p[0, 0].cpu().numpy() * ((inputs.arrays["wm"] + inputs.arrays["gm"]) >= float(self.s["tissue_min"]))
        out = self.outputs(p, inputs)
        out["infarct"] = (out["dead"] > 0.5) | inputs.arrays["core"].astype(bool)
        return Forecast(out, {}, 0.0, time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# the batched tissue-death unroll of the residual and UDE corrections
# ---------------------------------------------------------------------------------------------

def xue_unroll(flow_before, flow_after, wm, rep, end, dt_s, extra=None):
    """D at each voxel's own end time: the Xue 2021 model by classical RK4 (the torch twin's scheme),
    for voxels of several subjects at once.

    flow_before / flow_after: (V,) tensors, the flow the model sees before / after reperfusion
    (already divided by sigma); wm (V,) tensor; rep, end: (V,) arrays of hours (rep = inf: never
    reperfused). The time grid lands on every reperfusion and end time, with steps <= dt_s, so each
    voxel's H is piecewise constant over steps exactly as in its own solve. extra(d, tox, hp) ->
    (dd, dtox): rates added to the model's (the UDE correction)."""
    from neurohybrid.solvers.stroke import XUE2021 as P

    dev, dty = flow_before.device, flow_before.dtype
    mult = 1.0 + (P["wm_factor"] - 1.0) * wm
    hb = torch.sigmoid(-2.0 * (P["k1"] * flow_before * mult + P["k2"]))
    ha = torch.sigmoid(-2.0 * (P["k1"] * flow_after * mult + P["k2"]))
    rep = np.asarray(rep, np.float64)
    end = np.asarray(end, np.float64)
    edges = sorted(set(np.round(end, 9).tolist()) | set(np.round(rep[rep < end], 9).tolist()))
    kf, kt, kb = P["kf"], P["kt"], P["kb"]

    def rhs(d, tox, hp):
        alive = 1.0 - d
        dd, dt = kf * tox * alive, (kt * hp - kb * tox * (1.0 - hp)) * alive
        if extra is not None:
            ed, et = extra(d, tox, hp)
            dd, dt = dd + ed, dt + et
        return dd, dt

    d = torch.zeros_like(hb)
    tox = torch.zeros_like(hb)
    t = 0.0
    for e in edges:
        gap = (e - t) * 3600.0
        if gap <= 0:
            continue
        n = max(1, int(math.ceil(gap / float(dt_s) - 1e-9)))
        h = gap / n
        after = torch.as_tensor(rep <= t + 1e-9, device=dev)
        active = torch.as_tensor(end > t + 1e-9, device=dev, dtype=dty)
        hp = torch.where(after, ha, hb)
        for _ in range(n):
            a1, b1 = rhs(d, tox, hp)
            a2, b2 = rhs(d + 0.5 * h * a1, tox + 0.5 * h * b1, hp)
            a3, b3 = rhs(d + 0.5 * h * a2, tox + 0.5 * h * b2, hp)
            a4, b4 = rhs(d + h * a3, tox + h * b3, hp)
            d = d + active * (h / 6.0) * (a1 + 2.0 * a2 + 2.0 * a3 + a4)
            tox = tox + active * (h / 6.0) * (b1 + 2.0 * b2 + 2.0 * b3 + b4)
        t = e
    return d.clamp(0.0, 1.0)


class _Case:
    def __init__(self, inputs, fit, s, target=None):
        a, m = inputs.arrays, inputs.meta
        extra = cropped_target(inputs, target) if target is not None else None
        self.box = _box(inputs, s, extra)
        self.cand = mech.candidates(inputs, s)[self.box]
        self.image = features(inputs, s, self.box)
        self.cbf = a["cbf"][self.box][self.cand]
        self.wm = np.clip(a["wm"][self.box][self.cand], 0, 1)
        self.core = a["core"][self.box][self.cand]
        # per-voxel covariates of the pointwise (UDE) correction: deficit, depth, distance, times
        fm = feature_maps(inputs, s)
        tm = fm["times"]
        n = self.cbf.size
        self.voxel_cov = np.stack([fm["deficit"][self.box][self.cand], fm["depth"][self.box][self.cand],
                                   fm["dist"][self.box][self.cand], np.full(n, tm["t_imaging"]),
                                   np.full(n, tm["t_reperfusion"]), np.full(n, tm["reperfused"])], axis=1).astype(np.float32)
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


def _flows(cases, voxels, device, corrections=None):
    """Concatenated (flow_before, flow_after, wm, rep, end) of the given voxels of the cases; the
    residual corrections c (one (n_i,) tensor per case, or None) are added to the flow before reperfusion."""
    from neurohybrid.solvers.stroke import normal_cbf

    fb, fa, w, rep, end = [], [], [], [], []
    for k, (case, vox) in enumerate(zip(cases, voxels)):
        sig = case.fit.sensitivity
        f = torch.as_tensor(case.cbf[vox] / sig, dtype=torch.float32, device=device)
        if corrections is not None:
            f = (f + corrections[k]).clamp_min(0.0)
        fb.append(f)
        fa.append(torch.as_tensor(normal_cbf(case.wm[vox]) / sig, dtype=torch.float32, device=device))
        w.append(torch.as_tensor(case.wm[vox], dtype=torch.float32, device=device))
        n = len(vox)
        rep.append(np.full(n, np.inf if case.rep is None else case.rep))
        end.append(np.full(n, case.hours))
    return torch.cat(fb), torch.cat(fa), torch.cat(w), np.concatenate(rep), np.concatenate(end)


def residual_dead(net, case: _Case, s, device, voxels=None):
    """D at follow-up on the case's candidate voxels (or on the subset ``voxels`` of them), driven by
    CBF / sigma + c_phi; and mean c^2 over all candidate voxels.

    The correction c is a CNN of the whole image (spatial context); the tissue-death model is per
    voxel, so solving it on a subset gives exactly those voxels' values of the full solve."""
    dead, pens = residual_dead_many(net, [case], [voxels], s, device)
    return dead, pens[0]


def residual_dead_many(net, cases, voxels, s, device):
    """``residual_dead`` for several (case, voxel subset) items in one batched unroll: D of the
    concatenated voxels, and each item's penalty (mean c^2 over its case's candidate voxels)."""
    cs, pens, vox_list = [], [], []
    images = {}
    for case, vox in zip(cases, voxels):
        key = id(case)
        if key not in images:
            img = torch.as_tensor(case.image, device=device)[None]
            cand = torch.as_tensor(case.cand, device=device)
            c_all = RESIDUAL_SCALE * net(img)[0, 0][cand]
            images[key] = c_all
        c_all = images[key]
        pens.append(((c_all / RESIDUAL_SCALE) ** 2).mean() if c_all.numel() else torch.zeros((), device=device))
        vox = np.arange(case.cbf.size) if vox is None else np.asarray(vox)
        vox_list.append(vox)
        cs.append(c_all[torch.as_tensor(vox, device=device, dtype=torch.long)])
    from neurohybrid.disorders.stroke.death_grad import death_at_end

    fb, fa, w, rep, end = _flows(cases, vox_list, device, cs)
    # the same RK4 as xue_unroll, with D's exact derivative in the flow from a Numba kernel
    return death_at_end(fb, fa, w, rep, end, float(s["dt_s"])), pens


def _dead_loss(dead, target, s, device, bce: bool = False):
    """Soft Dice of sigmoid((D - 0.8) / soft_tau) against the infarct (+ its mean binary cross-entropy)."""
    from neurohybrid.solvers.stroke import CORE_THRESHOLD

    y = torch.as_tensor(target, dtype=torch.float32, device=device)
    logits = (dead - CORE_THRESHOLD) / float(s["soft_tau"])
    loss = soft_dice_loss(torch.sigmoid(logits), y)
    if bce:
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return loss


def voxel_items(cases, s, seed, max_voxels):
    """(case index, voxel indices) items: each case's candidate voxels outside the acute core
    (dead already: nothing to learn there), shuffled with a seed, at most ``max_voxels`` of them,
    cut into ``voxel_chunks`` chunks."""
    rng = np.random.default_rng(seed)
    items = []
    k = max(1, int(s["voxel_chunks"]))
    for i, case in enumerate(cases):
        pool = np.flatnonzero(~case.core.astype(bool))
        if pool.size == 0:
            continue
        pool = rng.permutation(pool)[:max(k, int(max_voxels))] if max_voxels else rng.permutation(pool)
        for chunk in np.array_split(pool, min(k, pool.size)):
            items.append((i, np.sort(chunk)))
    if not items:
        raise InputError("no training subject has candidate voxels outside its acute core: nothing to train on")
    return items


def train_voxel_items(params, cases, items, dead_fn, s, train_kw):
    """Train on voxel-chunk items: loss = soft Dice + binary cross-entropy of the follow-up infarct
    on the batch's voxels (+ the mean of what ``dead_fn`` adds per item, e.g. the APHYNITY penalty).
    dead_fn(cases, voxels) -> (dead of the concatenated voxels, per-item extra loss terms)."""
    from neurohybrid.hybrid.training import train_loop

    def loss_fn(idx):
        its = [items[i] for i in idx]
        dead, extras = dead_fn([cases[c] for c, _ in its], [v for _, v in its])
        # one soft Dice over the batch's voxels (a chunk alone holds few infarct voxels) + per-voxel BCE
        target = np.concatenate([cases[c].target[v] for c, v in its])
        return _dead_loss(dead, target, s, dead.device, bce=True) + sum(extras) / len(its)

    kw = dict(train_kw)
    if kw.get("batch_size") is None:
        kw["batch_size"] = int(s["voxel_batch"])
    return train_loop(params, loss_fn, len(items), **kw)


# ---------------------------------------------------------------------------------------------
# residual (APHYNITY) on the driving flow, and its amortised variant
# ---------------------------------------------------------------------------------------------

class Residual(StrokeFamily):
    name = "residual"
    trains_across_subjects = True

    def net(self):
        return TinyCNN(N_FEATURES, 1, int(self.s["hidden"]), 3, zero_init=True).to(self.device)

    def fit_subject(self, inputs, trained):
        return self.calibrate(inputs, self.prior_of(trained))

    def train_correction(self, cases, extra=None):
        net = self.net()
        lam = float(self.s["residual_penalty"])
        items = voxel_items(cases, self.s, self.seed, int(self.s["residual_train_voxels"]))

        def dead_fn(cs, vox):
            dead, pens = residual_dead_many(net, cs, vox, self.s, self.device)
            return dead, [lam * p for p in pens]

        result = train_voxel_items(net, cases, items, dead_fn, self.s, self.train_kw())
        return {"state_dict": net.state_dict(), "history": result.history, "val_history": result.val_history,
                "best_epoch": result.best_epoch, "settings": self.s, **(extra or {})}

    def train(self, pairs):
        prior = mech.sigma_prior(pairs, self.s)
        out = self.train_correction([_Case(i, self.calibrate(i, prior), self.s, t) for i, t in pairs])
        out["sigma_prior"] = prior
        return out

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
        return Forecast(self.outputs(dead, inputs), fit.parameters(), fit.seconds, time.perf_counter() - t,
                        fit.diagnostics())


def train_amortised(family: StrokeFamily, pairs) -> dict:
    """Labels: each training subject's sigma calibrated on its acute core AND follow-up infarct."""
    # amortised and amortised_residual train this same network (same seed, labels and settings): the
    # fold's shared work trains it once, on its own seeded generators, whichever family asks first
    return shared_work(pairs).get("stroke.train_amortised", (family.s, family.train_kw(), str(family.device)),
                                  lambda: _train_amortised(family, pairs), seed=family.seed)


def _train_amortised(family: StrokeFamily, pairs) -> dict:
    """``train_amortised`` without the memo."""
    xs, ys, labels = [], [], []
    for inputs, target in pairs:
        obs = mech.all_observations(inputs, target, family.s)
        # only sigma is used (no profile interval); amortised, amortised_residual and the sigma prior
        # of the other families share these fits
        fit = mech.calibrate(inputs, family.s, observations=obs, interval=False)
        labels.append({"subject": inputs.subject, "sensitivity": fit.sensitivity})
        xs.append(family.tensor(_image(inputs, _box(inputs, family.s)))[None])
        ys.append(torch.tensor([[math.log(fit.sensitivity)]], device=family.device))
    net = ParamNet(7, 1, int(family.s["hidden"])).to(family.device)
    history = train_param_net(net, xs, ys, family.train_kw())
    return {"amortised_state_dict": net.state_dict(), "amortised_history": history, "labels": labels}


def amortised_fit(family: StrokeFamily, inputs, trained) -> mech.StrokeFit:
    """sigma from the parameter network; when the acute core does not identify sigma, kept below
    the largest sigma at which nothing outside the core has died by the imaging time."""
    start = time.perf_counter()
    net = ParamNet(7, 1, int(family.s["hidden"])).to(family.device)
    net.load_state_dict(trained["amortised_state_dict"])
    with torch.no_grad():
        z = float(net(family.tensor(_image(inputs, _box(inputs, family.s)))[None])[0, 0])
    sigma = float(np.clip(math.exp(z), float(family.s["sens_min"]), float(family.s["sens_max"])))
    identified = mech.sigma_identified(inputs, family.s)
    top = None
    if not identified:
        top = mech.feasible_sigma_max(inputs, family.s)
        sigma = min(sigma, top)
    return mech.StrokeFit(sigma, seconds=time.perf_counter() - start, identified=identified, source="amortised",
                          feasible_max=top)


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
        return Forecast(self.outputs(dead, inputs), fit.parameters(), fit.seconds, time.perf_counter() - t,
                        fit.diagnostics())


class AmortisedResidual(Residual):
    name = "amortised_residual"

    def fit_subject(self, inputs, trained):
        return amortised_fit(self, inputs, trained)

    def train(self, pairs):
        amortised = train_amortised(self, pairs)
        return self.train_correction([_Case(i, amortised_fit(self, i, amortised), self.s, t) for i, t in pairs], amortised)


# ---------------------------------------------------------------------------------------------
# UDE: pointwise neural term in the tissue-death ODE
# ---------------------------------------------------------------------------------------------

class PointwiseCorrection(nn.Module):
    """g(u (B, 2N) = [D, T], covariates (B, N, 1 + n_cov) = [H, ...]) -> (B, 2N): one MLP shared by
    every voxel. Zero-initialised (starts as the mechanistic model); outputs scaled to per-second
    rates: ``scale`` for D (2e-6: a unit output moves D by ~0.2 per day), ``scale_t`` for T
    (default = scale; the UDE uses 4e-5, a tenth of the model's toxic production rate kt)."""

    def __init__(self, hidden=16, scale=2e-6, n_cov=0, scale_t=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 + int(n_cov), hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = scale
        self.scale_t = scale if scale_t is None else scale_t
        self.n_cov = int(n_cov)

    def forward(self, u, covariates=None, lap=None):
        b, n2 = u.shape
        n = n2 // 2
        cov = covariates.expand(b, n, covariates.shape[-1])
        x = torch.cat([u[:, :n, None], u[:, n:, None], cov[..., :1 + self.n_cov]], dim=-1)
        out = self.net(x)
        return torch.cat([self.scale * out[..., 0], self.scale_t * out[..., 1]], dim=1)


def _hypoxia(case: _Case):
    from neurohybrid.solvers.stroke import hypoxic_fraction, normal_cbf

    before = hypoxic_fraction(case.cbf / case.fit.sensitivity, case.wm)
    after = hypoxic_fraction(normal_cbf(case.wm) / case.fit.sensitivity, case.wm)
    return before.astype(np.float32), after.astype(np.float32)


class RateCorrection(nn.Module):
    """The UDE's neural term: (H, per-voxel covariates) -> (g_D, g_T) in (-1, 1), the relative change
    of the death rate and of the toxic production: dD/dt = kf T (1 - D) (1 + g_D),
    dT/dt = (kt H (1 + g_T) - kb T (1 - H)) (1 - D). Zero-initialised (the mechanistic model); the
    bounds keep the physics (D rises, stays <= 1; T >= 0; nothing happens in dead tissue)."""

    def __init__(self, hidden=16, n_cov=N_VOXEL_COVARIATES):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1 + int(n_cov), hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return torch.tanh(self.net(x))


def ude_dead_many(model, cases, voxels, s, device):
    """D at follow-up of the concatenated voxel subsets of the cases (None: all candidates), with the
    rates modulated by ``RateCorrection`` of (H, covariates) before and after reperfusion. Solved by
    the Numba RK4 of ``death_grad`` with the exact derivatives in the modulations (the torch unroll
    ``xue_unroll`` with a rate term gives the same numbers at ~100x the cost)."""
    from neurohybrid.disorders.stroke.death_grad import DeathUDE

    hb, ha, cov, rep, end = [], [], [], [], []
    for case, vox in zip(cases, voxels):
        vox = np.arange(case.cbf.size) if vox is None else np.asarray(vox)
        b, a = _hypoxia(case)
        hb.append(b[vox])
        ha.append(a[vox])
        cov.append(case.voxel_cov[vox])
        rep.append(np.full(vox.size, np.inf if case.rep is None else case.rep))
        end.append(np.full(vox.size, case.hours))
    hb, ha, cov = np.concatenate(hb), np.concatenate(ha), torch.as_tensor(np.concatenate(cov), device=device)
    xb = torch.cat([torch.as_tensor(hb, device=device)[:, None], cov], dim=1)
    xa = torch.cat([torch.as_tensor(ha, device=device)[:, None], cov], dim=1)
    g = torch.cat([model(xb), model(xa)], dim=1)
    return DeathUDE.apply(g, hb, ha, np.concatenate(rep), np.concatenate(end), float(s["dt_s"])).clamp(0.0, 1.0)


def ude_dead(model, case: _Case, s, device, voxels=None):
    """D at follow-up on the case's candidate voxels (or on the subset ``voxels`` of them)."""
    return ude_dead_many(model, [case], [voxels], s, device)


class UDE(StrokeFamily):
    name = "ude"
    trains_across_subjects = True

    def model(self):
        return RateCorrection(hidden=2 * int(self.s["hidden"])).to(self.device)

    def train(self, pairs):
        prior = mech.sigma_prior(pairs, self.s)
        cases = [_Case(i, self.calibrate(i, prior), self.s, t) for i, t in pairs]
        model = self.model()
        # The correction is pointwise (no coupling between voxels): items are chunks of voxels
        # (at most ude_train_voxels per subject), unrolled together.
        items = voxel_items(cases, self.s, self.seed, int(self.s["ude_train_voxels"]))

        def dead_fn(cs, vox):
            return ude_dead_many(model, cs, vox, self.s, self.device), [0.0] * len(cs)

        kw = self.train_kw()
        # one pointwise MLP and one Numba solve per step (~0.05 s): cheap epochs, as for SOL's 4x;
        # early stopping (patience) ends them once the validation chunks stop improving
        kw["epochs"] = UDE_EPOCH_FACTOR * kw["epochs"]
        result = train_voxel_items(model, cases, items, dead_fn, self.s, kw)
        return {"state_dict": model.state_dict(), "history": result.history, "val_history": result.val_history,
                "best_epoch": result.best_epoch, "settings": self.s, "sigma_prior": prior}

    def forecast(self, inputs, trained):
        check_trained(trained, self.name)
        fit = self.calibrate(inputs, self.prior_of(trained))
        t = time.perf_counter()
        model = self.model()
        model.load_state_dict(trained["state_dict"])
        case = _Case(inputs, fit, self.s)
        dead = np.zeros(0, np.float32)
        if case.cand.any():
            with torch.no_grad():
                dead = ude_dead(model, case, self.s, self.device).cpu().numpy()
        dead = case.on_grid(dead, inputs.arrays["cbf"].shape)
        return Forecast(self.outputs(dead, inputs), fit.parameters(), fit.seconds, time.perf_counter() - t,
                        fit.diagnostics())


# ---------------------------------------------------------------------------------------------
# solver in the loop: large-step semi-implicit solver + pointwise state correction (``stroke.sol``)
# ---------------------------------------------------------------------------------------------

class SolverInLoop(StrokeFamily):
    """Coarse solver (``sol.CoarseXueStep``, steps of at most ``sol_step_hours``) + a learned state
    correction after every step (``sol.SolCorrection``: gated, clamped, normalised inputs, the step
    length an input). Trained on fine-solver trajectories over the whole forecast horizon, sigma
    drawn from its range (``sol.fine_trajectories``); ``fit_correction`` validates on held-out
    draws and falls back to the plain coarse solver when the correction does not help there."""

    name = "sol"
    trains_across_subjects = True
    precomputed = False

    def model(self):
        return sol.corrected_solver(float(self.s["sol_step_hours"]), int(self.s["sol_hidden"]), self.device,
                                    scheme=str(self.s["sol_coarse_scheme"]))

    def train_kw(self, s=None):
        kw = super().train_kw(s)
        s = s or self.s
        kw["epochs"] = int(s["sol_epochs"])
        kw["patience"] = None if s["sol_patience"] is None else int(s["sol_patience"])
        if kw["batch_size"] is None:
            kw["batch_size"] = int(s["sol_batch_size"])
        return kw

    def fit_solver(self, voxels, shared=None) -> dict:
        """Train the correction on fine trajectories of these subjects' tissue (``sol.Voxels``)."""
        s = self.s
        shared = shared or shared_work(None)
        # the same fine trajectories train sol and sol_precomputed (once per fold's training pairs)
        fine, cov, info = shared.get("stroke.sol_fine_trajectories", (s, [v.name for v in voxels]),
                                     lambda: sol.fine_trajectories(voxels, s, self.seed))
        start = time.perf_counter()
        model = self.model()
        kw = dict(self.train_kw(), error_fn=sol.dead_horizon_error)  # validated on D (fit_correction's error_fn)
        out = train_corrected_solver(model, fine.to(self.device), cov.to(self.device), s, kw, precomputed=self.precomputed)
        out["training_data"] = dict(members=len(info), draws=info, voxels_per_member=int(cov.shape[1]),
                                    steps=int(fine.shape[1] - 1), seconds_fit=time.perf_counter() - start)
        return out

    def train(self, pairs):
        prior = mech.sigma_prior(pairs, self.s)
        out = self.fit_solver([sol.Voxels.of(inputs, self.s) for inputs, _ in pairs], shared_work(pairs))
        out["sigma_prior"] = prior
        return out

    def loaded(self, trained):
        from neurohybrid.hybrid.solver_in_loop import load_correction

        check_trained(trained, self.name)
        return load_correction(self.model(), trained)

    def compare(self, model, vox, sigma, shared=None) -> dict:
        """Coarse, corrected coarse and fine solver at sigma over the forecast horizon: D at follow-up of
        each, errors against the fine solver, best-of-2 wall times."""
        from neurohybrid.hybrid.solver_in_loop import time_call

        s = self.s
        with torch.no_grad():
            d_sol = sol.coarse_dead(model, vox, sigma, device=self.device).cpu().numpy()
            d_coarse = sol.coarse_dead(model, vox, sigma, corrected=False, device=self.device).cpu().numpy()

        def fine_reference():
            """(fine solution, best-of-2 wall time): the run that gives the solution is one of the two."""
            if not vox.cbf.size:
                return np.zeros(0), 0.0
            start = time.perf_counter()
            d = sol.fine_dead(vox, sigma, s)
            return d, min(time.perf_counter() - start, time_call(lambda: sol.fine_dead(vox, sigma, s), repeats=1))

        # the same reference for sol and sol_precomputed (memoised per process)
        d_fine, fine_cost = (shared or shared_work(None)).get("stroke.sol_fine_reference", (s, sigma), fine_reference)
        costs = {k: time_call(lambda c=c: sol.coarse_dead(model, vox, sigma, corrected=c, device=self.device), repeats=2)
                 for k, c in (("sol", True), ("coarse", False))}
        infarct = d_fine > CORE_THRESHOLD
        return dict(d_sol=d_sol, d_coarse=d_coarse, d_fine=d_fine,
                    sol_error_vs_fine=sol.dead_error(d_sol, d_fine), coarse_error_vs_fine=sol.dead_error(d_coarse, d_fine),
                    sol_dice_vs_fine=sol.dice(d_sol > CORE_THRESHOLD, infarct),
                    coarse_dice_vs_fine=sol.dice(d_coarse > CORE_THRESHOLD, infarct),
                    fine_cost_seconds=fine_cost, coarse_cost_seconds=costs["coarse"], sol_cost_seconds=costs["sol"])

    def forecast(self, inputs, trained):
        model = self.loaded(trained)
        fit = self.calibrate(inputs, self.prior_of(trained))
        vox = sol.Voxels.of(inputs, self.s)
        t = time.perf_counter()
        with torch.no_grad():
            d_sol = sol.coarse_dead(model, vox, fit.sensitivity, device=self.device).cpu().numpy()
        inference = time.perf_counter() - t
        cmp = self.compare(model, vox, fit.sensitivity, inputs.shared)
        dead = np.zeros(inputs.arrays["cbf"].shape, np.float32)
        dead[mech.candidates(inputs, self.s)] = d_sol
        keys = ("sol_error_vs_fine", "coarse_error_vs_fine", "sol_dice_vs_fine", "coarse_dice_vs_fine",
                "fine_cost_seconds", "coarse_cost_seconds", "sol_cost_seconds")
        extra = dict(**fit.diagnostics(), **{k: cmp[k] for k in keys}, use_correction=bool(model.use_correction),
                     sol_error_metric=sol.ERROR_METRIC.format(fine=self.s["fine_dt_s"]),
                     training_target=trained.get("training_target"))
        return Forecast(self.outputs(dead, inputs), fit.parameters(), fit.seconds, inference, extra)


class SolverPrecomputed(SolverInLoop):
    name = "sol_precomputed"
    precomputed = True


FAMILIES = {f.name: f for f in (Persistence, Mechanistic, DataDriven, Residual, UDE, SolverInLoop, SolverPrecomputed,
                                Amortised, AmortisedResidual)}
