"""The Alzheimer's network model shared by every family: settings, subject tensors, the local
network Fisher-KPP right-hand side in SUVR units, multiple-shooting prediction, the regional
correction and per-subject fits.

Mechanistic model (``neurohybrid.solvers.network`` "local" FKPP, Chaggar et al. 2025, written
with the growth normalised by the subject's SUVR amplitude A):

    du/dt = -kappa L (u - b) + alpha e (1 - e / A),   e = max(u - b, 0)

u: regional SUVR; L: the subject's max-normalised connectome Laplacian; b: the subject's healthy
baseline (robust, ``baseline``); A: the subject's SUVR amplitude (capacity b + A). theta =
(kappa, alpha, suvr_amplitude), all per subject. With SUVR = 1 + A * tau and tau following
du/dt = -kappa L tau + alpha tau (1 - tau), these are the same kappa, alpha and A.
Growth acts only on the excess over the baseline: a region reading below it (noise) is neither a
seed nor a sink.

Fair forecasts (every family sees the same information as persistence and data_driven): a
prediction always starts from an OBSERVED visit. Calibration is by multiple shooting: each
observed visit starts a member that predicts the next observed visit of its subject, and the
members of a subject share its theta; the forecast integrates from the last observed visit to
the held-out one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from neurohybrid.disorders.alzheimer.settings import Settings  # noqa: F401  (re-exported: the families read it here)
from neurohybrid.disorders.base import SubjectData
from neurohybrid.errors import InputError
from neurohybrid.hybrid.calibration import calibrate_gradient_many, gaussian_nll, laplace_covariance
from neurohybrid.hybrid.neural_ode import HybridDynamics, integrate, transport
from neurohybrid.solvers.network import laplacian

THETA_NAMES = ("kappa", "alpha", "suvr_amplitude")
N_COVARIATES = 4  # |x|, y, z of the region's centroid (MNI, /100 mm), z-scored log regional volume


@dataclasses.dataclass
class Subject:
    """One subject's observations as arrays (numpy), ready to batch."""

    subject: str
    regions: list[str]
    suvr: np.ndarray          # (V, N) observed visits
    years: np.ndarray         # (V,)
    lap: np.ndarray           # (N, N)
    volumes: np.ndarray       # (N,)
    centroids: np.ndarray     # (N, 3) region centroids, MNI mm (atlas, not subject-specific truth)
    target_years: float | None = None

    @classmethod
    def from_inputs(cls, data: SubjectData, target: SubjectData | None = None) -> "Subject":
        a = data.arrays
        for key in ("suvr", "years", "connectome", "volumes"):
            if key not in a:
                raise InputError(f"Alzheimer's model inputs lack array '{key}'", subject=data.subject)
        suvr, years = np.asarray(a["suvr"], float), np.asarray(a["years"], float)
        if suvr.ndim != 2 or suvr.shape[0] != years.size or suvr.shape[0] < 1:
            raise InputError(f"inputs 'suvr' {suvr.shape} and 'years' {years.shape} disagree", subject=data.subject)
        regions = list(data.meta.get("regions", []))
        if len(regions) != suvr.shape[1]:
            raise InputError("inputs list a different number of regions than SUVR values", subject=data.subject)
        if "centroids" in a:
            centroids = np.asarray(a["centroids"], float)
        else:  # model inputs built before centroids were stored: the same atlas lookup
            from neurohybrid.disorders.alzheimer.inputs import region_centroids

            centroids = region_centroids(regions, subject=data.subject)
        if centroids.shape != (len(regions), 3) or not np.all(np.isfinite(centroids)):
            raise InputError(f"inputs 'centroids' {centroids.shape} must be finite, one row per region", subject=data.subject)
        if target is not None:
            tsuvr = np.asarray(target.arrays["suvr"], float)
            if list(target.meta.get("regions", [])) != regions:
                raise InputError("target regions differ from the inputs' regions", subject=data.subject)
            suvr = np.vstack([suvr, tsuvr[None]])
            years = np.append(years, float(target.meta["years"]))
        return cls(data.subject, regions, suvr, years, laplacian(a["connectome"]), np.asarray(a["volumes"], float),
                   centroids, data.meta.get("target_years"))

    def subset(self, regions: list[str]) -> "Subject":
        idx = [self.regions.index(r) for r in regions]
        return dataclasses.replace(self, regions=list(regions), suvr=self.suvr[:, idx],
                                   lap=self.lap[np.ix_(idx, idx)], volumes=self.volumes[idx],
                                   centroids=self.centroids[idx])

    def visits(self, n: int) -> "Subject":
        """The first n visits (e.g. what a test subject would have: all but the last)."""
        return dataclasses.replace(self, suvr=self.suvr[:n], years=self.years[:n])

    def baseline(self, settings: Settings) -> np.ndarray:
        """Robust healthy level per region (N,): the subject's healthy level b_s, the
        ``baseline_quantile`` of its regions' mean SUVR over the visits (capped at
        ``suvr_baseline``), lowered to a region's own mean where that is lower (partial volume):
        a mean over visits, not the smallest observed value, so noise does not become a seed."""
        mean = self.suvr.mean(axis=0)
        level = min(settings.suvr_baseline, float(np.quantile(mean, settings.baseline_quantile)))
        return np.minimum(level, mean)

    def covariates(self) -> np.ndarray:
        """(N, 4) regional covariates from the subject's own processed data: the atlas centroid
        (|x|, y, z in MNI mm / 100) and the z-scored log regional volume."""
        lv = np.log(self.volumes)
        c = self.centroids / 100.0
        return np.column_stack([np.abs(c[:, 0]), c[:, 1], c[:, 2], (lv - lv.mean()) / max(lv.std(), 1e-6)])

    def features(self, settings: Settings) -> np.ndarray:
        """Summary features of the observed visits for amortised inference (region-count free):
        mean and sd of the excess SUVR at the first and last visit, the mean and 90th percentile
        of its rate of change, the fraction of regions clearly above baseline, the follow-up span."""
        excess = self.suvr - self.baseline(settings)
        span = max(float(self.years[-1] - self.years[0]), 1e-6)
        rate = (excess[-1] - excess[0]) / span
        return np.array([
            excess[0].mean(), excess[0].std(), excess[-1].mean(), excess[-1].std(),
            rate.mean(), np.quantile(rate, 0.9), (excess[-1] > 0.2).mean(), span,
        ])

    def theta_init(self, settings: Settings) -> np.ndarray:
        """First calibration start: the box's centre for kappa and alpha, the amplitude from the
        subject's largest observed excess (a region near its plateau)."""
        lo, hi = settings.amplitude_bounds
        amp = float(np.clip(1.1 * np.max(self.suvr - self.baseline(settings)), lo * 1.01, hi * 0.99))
        c = settings.prior_centre()
        return np.array([c[0], c[1], amp])


N_FEATURES = 8


def common_regions(subjects: list[Subject]) -> list[str]:
    common = set(subjects[0].regions)
    for s in subjects[1:]:
        common &= set(s.regions)
    regions = [r for r in subjects[0].regions if r in common]
    if len(regions) < 2:
        raise InputError("training subjects share fewer than 2 connectome regions")
    return regions


@dataclasses.dataclass
class Batch:
    """Members stacked for one batched solve. A member starts at one observed visit of a subject
    (``first``, at times[:, 0]) and predicts the later visits; visits are padded by repeating the
    last (mask 0). ``owner``: the row of the parameter table (a subject, or a subject's restart)
    the member belongs to."""

    obs: torch.Tensor       # (M, T, N)
    times: torch.Tensor     # (M, T)
    mask: torch.Tensor      # (M, T) 1 = observed later visit that counts in the loss
    lap: torch.Tensor       # (M, N, N)
    base: torch.Tensor      # (M, N) robust healthy baseline
    cov: torch.Tensor       # (M, N, 4) regional covariates (Subject.covariates)
    rid: torch.Tensor       # (M, N) long: region index in the correction's vocabulary
    first: torch.Tensor     # (M, N) start state: the observed visit the member starts from
    owner: torch.Tensor     # (M,) long
    rho: torch.Tensor       # (M,) spectral radius of the member's Laplacian (RK4 step control)

    @property
    def size(self) -> int:
        return self.obs.shape[0]

    def select(self, idx) -> "Batch":
        return Batch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def of_owners(self, owners) -> "Batch":
        """The members of the given owners (parameter rows keep their numbering)."""
        keep = torch.isin(self.owner, torch.as_tensor(list(owners), device=self.owner.device))
        return self.select(keep)


def region_index(regions: list[str], vocab: list[str] | None) -> np.ndarray:
    """Index of each region in the vocabulary; unknown regions (and no vocabulary) -> len(vocab)."""
    if vocab is None:
        return np.zeros(len(regions), dtype=np.int64)
    lookup = {r: i for i, r in enumerate(vocab)}
    return np.array([lookup.get(r, len(vocab)) for r in regions], dtype=np.int64)


def make_batch(subjects: list[Subject], settings: Settings, device, *, forecast_times=None, repeats: int = 1,
               vocab: list[str] | None = None, dtype=None) -> Batch:
    """Stack subjects as members.

    Without ``forecast_times`` (calibration / training, multiple shooting): every observed visit
    but the last starts a member that predicts the next visit of its subject (the forecast task:
    one interval ahead of an observed state); all members integrate in parallel.
    With ``forecast_times`` (one time per subject): one member per subject starting at its LAST
    observed visit and predicting that time (mask 0: nothing to compare with).
    repeats: each subject's members r times, owners subject * repeats + r (calibration restarts).
    """
    dtype = dtype or settings.torch_dtype
    rows = []  # (subject index, owner, start visit, times, obs, mask)
    for p, s in enumerate(subjects):
        nv = s.suvr.shape[0]
        for r in range(repeats):
            owner = p * repeats + r
            if forecast_times is not None:
                rows.append((p, owner, nv - 1, [s.years[-1], float(forecast_times[p])], [s.suvr[-1], s.suvr[-1]], [0.0, 0.0]))
                continue
            if nv < 2:
                raise InputError("calibration needs at least 2 visits", subject=s.subject)
            for k in range(nv - 1):
                rows.append((p, owner, k, list(s.years[k:k + 2]), list(s.suvr[k:k + 2]), [0.0, 1.0]))
    length = max(len(r[3]) for r in rows)
    times, obs, mask = [], [], []
    for _, _, _, t, o, m in rows:
        pad = length - len(t)
        times.append(t + [t[-1]] * pad), obs.append(o + [o[-1]] * pad), mask.append(m + [0.0] * pad)
    per = [(s.lap, s.baseline(settings), s.covariates(), region_index(s.regions, vocab),
            float(np.abs(np.linalg.eigvals(s.lap)).max())) for s in subjects]

    def tt(x, dt=dtype):
        return torch.as_tensor(np.asarray(x, dtype=np.float64 if dt.is_floating_point else np.int64), dtype=dt,
                               device=device)

    idx = [r[0] for r in rows]
    return Batch(tt(obs), tt(times), tt(mask), tt([per[i][0] for i in idx]), tt([per[i][1] for i in idx]),
                 tt([per[i][2] for i in idx]), tt([per[i][3] for i in idx], torch.long),
                 tt([subjects[r[0]].suvr[r[2]] for r in rows]), tt([r[1] for r in rows], torch.long),
                 tt([per[i][4] for i in idx]))


# ------------------------------------------------------------------------------------------
# dynamics


def mechanistic_rhs(theta, base, lap):
    """du/dt of the local network FKPP for members: theta (M, 3), base (M, N), lap (M, N, N)."""
    kappa, alpha, amp = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]

    def f(u):
        excess = u - base
        e = torch.relu(excess)
        return -kappa * transport(excess, lap) + alpha * e * (1.0 - e / amp)
    return f


@dataclasses.dataclass
class Context:
    """What a correction sees of a member besides its state: baseline, covariates, region ids."""

    base: torch.Tensor
    cov: torch.Tensor
    rid: torch.Tensor

    def repeat(self, times: int) -> "Context":
        return Context(self.base.repeat_interleave(times, 0), self.cov.repeat_interleave(times, 0),
                       self.rid.repeat_interleave(times, 0))


class RegionCorrection(nn.Module):
    """A regional correction g(u) with one MLP shared by all regions, fed the regional covariates
    (centroid, volume) and a learned embedding of the region's identity.

    mode "excess" (hybrids): g = relu(e) * r_i, e = u - b, r_i = rate * tanh(h(covariates_i,
    embedding_i)): a learned per-region rate on the disease excess (clearance, extra growth),
    zero where there is no excess, never pushing a region below its baseline, bounded by
    ``rate`` per year and linear in the excess, so it does not extrapolate wildly to subjects
    further along than the training ones. mode "free" (data_driven): g = rate * tanh(h(e, L e,
    covariates, embedding)), a general graph neural ODE.
    The last layer starts at zero: a hybrid starts as its mechanistic model, data_driven as
    persistence. Regions outside the training vocabulary get a zero embedding.
    """

    def __init__(self, vocab: list[str], hidden: int = 16, embedding_dim: int = 4, mode: str = "excess",
                 rate: float = 1.0, n_covariates: int = N_COVARIATES):
        super().__init__()
        if mode not in ("excess", "free"):
            raise ValueError(f"unknown correction mode {mode!r}")
        self.vocab = list(vocab)
        self.mode = mode
        self.rate = float(rate)
        self.embedding_dim = int(embedding_dim)
        if self.embedding_dim > 0:
            self.embed = nn.Embedding(len(self.vocab) + 1, self.embedding_dim, padding_idx=len(self.vocab))
            with torch.no_grad():
                self.embed.weight.normal_(0.0, 0.1)
                self.embed.weight[len(self.vocab)].zero_()
        else:
            self.embed = None
        self.state_inputs = mode == "free"
        n_in = 2 * self.state_inputs + n_covariates + self.embedding_dim
        last = nn.Linear(hidden, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), last)

    def config(self) -> dict:
        return {"vocab": self.vocab, "hidden": self.net[0].out_features, "embedding_dim": self.embedding_dim,
                "mode": self.mode, "rate": self.rate,
                "n_covariates": self.net[0].in_features - 2 * self.state_inputs - self.embedding_dim}

    def _rate(self, excess, ctx: Context, lap):
        feats = [excess[..., None], transport(excess, lap)[..., None]] if self.state_inputs else []
        feats.append(ctx.cov.expand(*excess.shape, ctx.cov.shape[-1]))
        if self.embed is not None:
            feats.append(self.embed(ctx.rid).expand(*excess.shape, self.embedding_dim))
        return self.rate * torch.tanh(self.net(torch.cat(feats, dim=-1)).squeeze(-1))

    def forward(self, u, ctx: Context, lap):
        excess = u - ctx.base
        h = self._rate(excess, ctx, lap)
        return torch.relu(excess) * h if self.mode == "excess" else h

    def rate_ridge(self, ctx: Context) -> torch.Tensor:
        """Mean squared regional rate r_i (mode "excess"): keeps the rates of regions the training
        data say nothing about (no excess in any training subject) at zero."""
        if self.mode != "excess":
            return ctx.base.new_zeros(())
        return (self._rate(ctx.base, ctx, None) ** 2).mean()


def correction_state(corr: RegionCorrection) -> dict:
    return {"correction": {k: v.detach().cpu() for k, v in corr.state_dict().items()}, "correction_config": corr.config()}


def load_correction(trained: dict, device, dtype) -> RegionCorrection:
    corr = RegionCorrection(**trained["correction_config"])
    corr.load_state_dict(trained["correction"])
    return corr.to(device=device, dtype=dtype)


RK4_STABLE = 2.0  # h * (stiffness bound) at most this (RK4's real-axis stability limit is 2.785)


def stable_step(theta, batch: Batch, settings: Settings, correction=None) -> float:
    """The RK4 step: ``dt``, shortened so that h * (kappa rho(L) + alpha (1 + 2 e_max / A) + rate)
    <= RK4_STABLE for every member (a wide kappa box reaches stiff transport: rho(L) of a
    max-normalised connectome Laplacian is ~3.6 for tvb-data's DK-68)."""
    with torch.no_grad():
        e_max = torch.relu(batch.first - batch.base).amax(dim=-1)
        lam = theta[:, 0] * batch.rho + theta[:, 1] * (1.0 + 2.0 * e_max / theta[:, 2])
        lam = float(lam.max()) + (correction.rate if correction is not None else 0.0)
    return min(settings.dt, RK4_STABLE / max(lam, 1e-9))


def member_theta(theta_rows: torch.Tensor, batch: Batch) -> torch.Tensor:
    return theta_rows[batch.owner]


def predict(theta_rows: torch.Tensor, batch: Batch, settings: Settings, correction=None):
    """(states (M, T, N) at batch.times, each member from its observed start state; correction
    penalty (M,): mean over the states of ||g||^2). theta_rows: (owners, 3), indexed by batch.owner."""
    theta = member_theta(theta_rows, batch)
    mech = mechanistic_rhs(theta, batch.base, batch.lap)
    dyn = HybridDynamics(mech, correction)
    ctx = Context(batch.base, batch.cov, batch.rid)
    dyn.set_context(ctx, batch.lap)
    pred = integrate(dyn, batch.first, batch.times, method="rk4", step_size=stable_step(theta, batch, settings, correction),
                     t0=batch.times[:, 0], adjoint=settings.adjoint)
    if correction is None:
        return pred, torch.zeros(batch.size, dtype=pred.dtype, device=pred.device)
    m, t, n = pred.shape
    g = correction(pred.reshape(m * t, n), ctx.repeat(t), batch.lap.repeat_interleave(t, 0))
    return pred, (g ** 2).sum(dim=-1).reshape(m, t).mean(dim=1)


def owner_misfit(pred: torch.Tensor, batch: Batch, n_owners: int, penalty: torch.Tensor | None = None, lam: float = 0.0):
    """Mean squared error over each owner's predicted (visit, region) entries: (n_owners,)
    (0 for owners without members), plus lam * the owner's mean correction penalty."""
    sq = ((pred - batch.obs) ** 2).mean(dim=-1) * batch.mask
    sse = torch.zeros(n_owners, dtype=pred.dtype, device=pred.device).index_add(0, batch.owner, sq.sum(dim=1))
    cnt = torch.zeros(n_owners, dtype=pred.dtype, device=pred.device).index_add(0, batch.owner, batch.mask.sum(dim=1))
    out = sse / cnt.clamp_min(1.0)
    if penalty is not None and lam:
        pen = torch.zeros(n_owners, dtype=pred.dtype, device=pred.device).index_add(0, batch.owner, penalty)
        members = torch.zeros(n_owners, dtype=pred.dtype, device=pred.device).index_add(
            0, batch.owner, torch.ones_like(penalty))
        out = out + lam * pen / members.clamp_min(1.0)
    return out


def fit_subjects(subjects: list[Subject], settings: Settings, device, correction=None, seed=None, shared=None):
    """Per-subject calibration of theta by multiple shooting on each subject's visits, all
    subjects and restarts in one batched solve per iteration. Returns CalibrationResults.

    Without a correction the fit is done once per ``shared`` (``SharedWork`` of the subject's inputs
    or of the fold's training pairs): the residual, UDE and amortised trainings of a fold start
    from the same mechanistic fits of its training subjects."""
    if correction is None and shared is not None:
        depends_on = ([(s.subject, int(s.suvr.shape[0])) for s in subjects], dataclasses.asdict(settings), seed, str(device))
        return shared.get("alzheimer.fit_subjects", depends_on, lambda: _fit_subjects(subjects, settings, device, None, seed))
    return _fit_subjects(subjects, settings, device, correction, seed)


def _fit_subjects(subjects, settings, device, correction=None, seed=None):
    r = max(1, settings.restarts)
    rep = make_batch(subjects, settings, device, repeats=r, vocab=getattr(correction, "vocab", None))
    n_rows = len(subjects) * r
    if correction is not None:
        for p in correction.parameters():
            p.requires_grad_(False)

    def loss_fn(theta):
        pred, _ = predict(theta.to(rep.obs.dtype), rep, settings, correction)
        return owner_misfit(pred, rep, n_rows)

    try:
        return calibrate_gradient_many(loss_fn, settings.bounds(), len(subjects),
                                       init=[s.theta_init(settings) for s in subjects], n_restarts=r,
                                       steps=settings.fit_iterations, lr=settings.fit_learning_rate,
                                       lbfgs_steps=settings.lbfgs_iterations, seed=settings.seed if seed is None else seed,
                                       dtype=rep.obs.dtype, device=rep.obs.device, tol=1e-7)
    finally:
        if correction is not None:
            for p in correction.parameters():
                p.requires_grad_(True)


def forecast(theta: np.ndarray | torch.Tensor, subject: Subject, settings: Settings, device, correction=None):
    """(forecast (N,) at subject.target_years from its LAST observed visit, mechanistic-only
    forecast (N,), correction penalty) for theta (3,)."""
    batch = make_batch([subject], settings, device, forecast_times=[subject.target_years],
                       vocab=getattr(correction, "vocab", None))
    th = torch.as_tensor(np.asarray(theta, dtype=np.float64)[None] if not torch.is_tensor(theta) else theta.reshape(1, -1),
                         dtype=batch.obs.dtype, device=batch.obs.device)
    with torch.no_grad():
        pred, pen = predict(th, batch, settings, correction)
        mech = pred if correction is None else predict(th, batch, settings)[0]
    return pred[0, -1], mech[0, -1], float(pen[0])


def laplace_sd(theta: np.ndarray, subject: Subject, settings: Settings, correction=None) -> np.ndarray:
    """Laplace standard deviations of theta for one subject (float64), the noise variance
    estimated from the multiple-shooting residuals at the optimum (n_obs - 3 degrees of freedom)."""
    corr = None
    if correction is not None:
        import copy
        corr = copy.deepcopy(correction).to("cpu", torch.float64)  # the Laplace step runs on the CPU in float64
        for p in corr.parameters():
            p.requires_grad_(False)
    batch = make_batch([subject], settings, None, dtype=torch.float64, vocab=getattr(corr, "vocab", None))
    n_obs = int(float(batch.mask.sum()) * subject.suvr.shape[1])

    def sse(th):
        pred, _ = predict(th[None], batch, settings, corr)
        return ((pred - batch.obs) ** 2 * batch.mask[..., None]).sum()

    with torch.no_grad():
        sse0 = float(sse(torch.as_tensor(theta, dtype=torch.float64)))
    sigma2 = max(sse0 / max(n_obs - 3, 1), 1e-12)
    _, std = laplace_covariance(lambda th: gaussian_nll(sse(th), n_obs, sigma2), theta)
    return std


def theta_dict(theta, std=None) -> dict:
    out = {n: float(v) for n, v in zip(THETA_NAMES, theta)}
    if std is not None:
        out.update({f"{n}_sd": (float(v) if math.isfinite(v) else None) for n, v in zip(THETA_NAMES, std)})
    return out
