"""The Alzheimer's network model shared by every family: settings, subject tensors, the local
network Fisher-KPP right-hand side in SUVR units, trajectory prediction and per-subject fits.

Mechanistic model (``neurohybrid.solvers.network``, model "local", Chaggar et al. 2025):

    du/dt = -kappa L (u - b) + alpha (u - b)(c - u)

u: regional SUVR; L: the subject's max-normalised connectome Laplacian; b: regional baseline
(the healthy level ``suvr_baseline``, lowered to a region's smallest observed SUVR so that noise
below it is not a state the model cannot hold); c: carrying capacity ``suvr_capacity``.
Per-subject parameters theta = (kappa, alpha, scale): the initial state is
u0 = b + scale * max(SUVR_first_visit - b, 0), i.e. the first visit with its excess rescaled
(the first visit is noisy; the scale lets the fit trade initial amplitude against growth).

Every prediction integrates from the subject's first visit (per-member visit times, RK4 with
step ``dt``) through the observed visits to the requested ones.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from neurohybrid.disorders.base import SubjectData
from neurohybrid.errors import InputError
from neurohybrid.hybrid.calibration import Bounds, calibrate_gradient_many, gaussian_nll, laplace_covariance
from neurohybrid.hybrid.neural_ode import HybridDynamics, integrate, transport
from neurohybrid.hybrid.residual import ParallelResidual
from neurohybrid.solvers.network import laplacian

THETA_NAMES = ("kappa", "alpha", "scale")


def _get(config: dict, key: str, default):
    """alzheimer.<key> overrides models.<key>; both absent -> default."""
    for section in ("alzheimer", "models"):
        sec = config.get(section) or {}
        if key in sec and sec[key] is not None:
            return sec[key]
    return default


@dataclasses.dataclass
class Settings:
    """Every config key the Alzheimer's families read (section ``alzheimer``, falling back to
    ``models`` for the shared ones); see ``from_config``."""

    suvr_baseline: float = 1.0
    suvr_capacity: float = 3.0
    kappa_bounds: tuple[float, float] = (0.005, 3.0)
    alpha_bounds: tuple[float, float] = (0.01, 2.0)
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    sol_kappa_range: tuple[float, float] | None = None
    sol_alpha_range: tuple[float, float] | None = None
    dt: float = 0.5
    restarts: int = 2
    fit_iterations: int = 30
    fit_learning_rate: float = 0.1
    lbfgs_iterations: int = 5
    epochs: int = 40
    learning_rate: float = 0.01
    theta_learning_rate: float = 0.01
    hidden: int = 16
    residual_penalty: float = 0.01
    weight_decay: float = 0.0
    batch_size: int | None = None
    val_fraction: float = 0.0
    patience: int | None = None
    sol_steps: int = 4
    sol_coarse_dt: float = 1.5
    sol_samples: int = 3
    sol_trajectory_steps: int = 4
    amortised_training: str = "end_to_end"
    adjoint: bool = False
    dtype: str = "float32"
    seed: int = 0
    time_limit_s: float | None = None
    torch_threads: int = 1

    @classmethod
    def from_config(cls, config: dict) -> "Settings":
        config = config or {}
        d = cls()

        def pair(key, default):
            v = _get(config, key, default)
            return None if v is None else tuple(float(x) for x in v)

        s = cls(
            suvr_baseline=float(_get(config, "suvr_baseline", d.suvr_baseline)),
            suvr_capacity=float(_get(config, "suvr_capacity", d.suvr_capacity)),
            # the search box is deliberately wide and independent of the synthetic cohort's priors
            kappa_bounds=pair("kappa_bounds", d.kappa_bounds),
            alpha_bounds=pair("alpha_bounds", d.alpha_bounds),
            scale_bounds=pair("scale_bounds", d.scale_bounds),
            sol_kappa_range=pair("sol_kappa_range", None),
            sol_alpha_range=pair("sol_alpha_range", None),
            dt=float(_get(config, "dt", d.dt)),
            restarts=int(_get(config, "restarts", d.restarts)),
            fit_iterations=int(_get(config, "fit_iterations", d.fit_iterations)),
            fit_learning_rate=float(_get(config, "fit_learning_rate", d.fit_learning_rate)),
            lbfgs_iterations=int(_get(config, "lbfgs_iterations", d.lbfgs_iterations)),
            epochs=int(_get(config, "epochs", d.epochs)),
            learning_rate=float(_get(config, "learning_rate", d.learning_rate)),
            theta_learning_rate=float(_get(config, "theta_learning_rate", d.theta_learning_rate)),
            hidden=int(_get(config, "hidden", d.hidden)),
            residual_penalty=float(_get(config, "residual_penalty", d.residual_penalty)),
            weight_decay=float(_get(config, "weight_decay", d.weight_decay)),
            batch_size=_get(config, "batch_size", d.batch_size),
            val_fraction=float(_get(config, "val_fraction", d.val_fraction)),
            patience=_get(config, "patience", d.patience),
            sol_steps=int(_get(config, "sol_steps", d.sol_steps)),
            sol_coarse_dt=float(_get(config, "sol_coarse_dt", d.sol_coarse_dt)),
            sol_samples=int(_get(config, "sol_samples", d.sol_samples)),
            sol_trajectory_steps=int(_get(config, "sol_trajectory_steps", d.sol_trajectory_steps)),
            amortised_training=str(_get(config, "amortised_training", d.amortised_training)),
            adjoint=bool(_get(config, "adjoint", d.adjoint)),
            dtype=str(_get(config, "dtype", d.dtype)),
            seed=int(config.get("seed", d.seed) or 0),
            time_limit_s=_get(config, "train_time_limit_s", d.time_limit_s),
            torch_threads=int(_get(config, "torch_threads", d.torch_threads)),
        )
        if config.get("sloppy"):
            # tests / smoke runs: fewer iterations everywhere, same code paths
            s.epochs = min(s.epochs, 15)
            s.fit_iterations = min(s.fit_iterations, 15)
            s.restarts = min(s.restarts, 2)
            s.lbfgs_iterations = min(s.lbfgs_iterations, 3)
            s.sol_samples = min(s.sol_samples, 2)
        if s.amortised_training not in ("end_to_end", "calibrated"):
            raise InputError(f"alzheimer.amortised_training must be end_to_end or calibrated, got {s.amortised_training!r}")
        if not s.suvr_capacity > s.suvr_baseline:
            raise InputError("alzheimer.suvr_capacity must exceed alzheimer.suvr_baseline")
        if s.patience is not None:
            s.patience = int(s.patience)
        if s.batch_size is not None:
            s.batch_size = int(s.batch_size)
        return s

    @property
    def torch_dtype(self):
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def bounds(self) -> Bounds:
        lo = [self.kappa_bounds[0], self.alpha_bounds[0], self.scale_bounds[0]]
        hi = [self.kappa_bounds[1], self.alpha_bounds[1], self.scale_bounds[1]]
        return Bounds(lo, hi, log=[True, True, True])

    def sol_bounds(self) -> Bounds:
        """Where the solver-in-the-loop network is trained, and so where its calibration searches
        (a learned correction is only valid where it was trained): sol_kappa_range /
        sol_alpha_range when set, else the calibration bounds."""
        k = self.sol_kappa_range or self.kappa_bounds
        a = self.sol_alpha_range or self.alpha_bounds
        return Bounds([k[0], a[0], self.scale_bounds[0]], [k[1], a[1], self.scale_bounds[1]], log=[True, True, True])

    def prior_centre(self) -> np.ndarray:
        b = self.bounds()
        return np.sqrt(b.lower * b.upper)

    def train_kw(self) -> dict:
        return dict(epochs=self.epochs, lr=self.learning_rate, weight_decay=self.weight_decay, batch_size=self.batch_size,
                    val_fraction=self.val_fraction, patience=self.patience, seed=self.seed,
                    time_limit_s=self.time_limit_s)


@dataclasses.dataclass
class Subject:
    """One subject's observations as arrays (numpy), ready to batch."""

    subject: str
    regions: list[str]
    suvr: np.ndarray          # (V, N) observed visits
    years: np.ndarray         # (V,)
    lap: np.ndarray           # (N, N)
    volumes: np.ndarray       # (N,)
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
        if target is not None:
            tsuvr = np.asarray(target.arrays["suvr"], float)
            if list(target.meta.get("regions", [])) != regions:
                raise InputError("target regions differ from the inputs' regions", subject=data.subject)
            suvr = np.vstack([suvr, tsuvr[None]])
            years = np.append(years, float(target.meta["years"]))
        return cls(data.subject, regions, suvr, years, laplacian(a["connectome"]), np.asarray(a["volumes"], float),
                   data.meta.get("target_years"))

    def subset(self, regions: list[str]) -> "Subject":
        idx = [self.regions.index(r) for r in regions]
        return dataclasses.replace(self, regions=list(regions), suvr=self.suvr[:, idx],
                                   lap=self.lap[np.ix_(idx, idx)], volumes=self.volumes[idx])

    def features(self, settings: Settings) -> np.ndarray:
        """Summary features of the observed visits for amortised inference (region-count free):
        mean and sd of the excess SUVR at the first and last visit, the mean rate of change,
        the fraction of regions clearly above baseline, and the follow-up span."""
        excess = self.suvr - settings.suvr_baseline
        span = max(float(self.years[-1] - self.years[0]), 1e-6)
        rate = (excess[-1] - excess[0]) / span
        return np.array([
            excess[0].mean(), excess[0].std(), excess[-1].mean(), excess[-1].std(),
            rate.mean(), np.quantile(rate, 0.9), (excess[-1] > 0.2).mean(), span,
        ])


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
    """Subjects stacked for one batched solve; visits padded by repeating the last (mask 0)."""

    obs: torch.Tensor       # (B, T, N)
    times: torch.Tensor     # (B, T)
    mask: torch.Tensor      # (B, T) 1 = observed visit that counts in the loss
    lap: torch.Tensor       # (B, N, N)
    base: torch.Tensor      # (B, N)
    cov: torch.Tensor       # (B, N, 1): z-scored log regional volume
    first: torch.Tensor     # (B, N) first observed visit

    @property
    def size(self) -> int:
        return self.obs.shape[0]

    def select(self, idx) -> "Batch":
        return Batch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def repeat(self, r: int) -> "Batch":
        """Each member r times (member-major): restarts of one calibration."""
        return Batch(*(getattr(self, f.name).repeat_interleave(r, dim=0) for f in dataclasses.fields(self)))


def make_batch(subjects: list[Subject], settings: Settings, device, *, extra_times=None, observed_visits=None,
               dtype=None) -> Batch:
    """Stack subjects. extra_times: per subject, times to predict after the observed visits (mask 0).
    observed_visits: per subject, how many leading visits are observed (default all)."""
    dtype = dtype or settings.torch_dtype
    rows_t, rows_o, rows_m = [], [], []
    for i, s in enumerate(subjects):
        nv = s.suvr.shape[0] if observed_visits is None else observed_visits[i]
        t = list(s.years[:nv])
        o = list(s.suvr[:nv])
        m = [1.0] * nv
        for extra in ([] if extra_times is None else list(np.atleast_1d(extra_times[i]))):
            t.append(float(extra))
            o.append(s.suvr[nv - 1])
            m.append(0.0)
        rows_t.append(t), rows_o.append(o), rows_m.append(m)
    length = max(len(t) for t in rows_t)
    for t, o, m in zip(rows_t, rows_o, rows_m):
        while len(t) < length:
            t.append(t[-1]), o.append(o[-1]), m.append(0.0)
    base = []
    cov = []
    for s in subjects:
        base.append(np.minimum(settings.suvr_baseline, s.suvr.min(axis=0)))
        lv = np.log(s.volumes)
        cov.append(((lv - lv.mean()) / max(lv.std(), 1e-6))[:, None])

    def tt(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)

    return Batch(tt(rows_o), tt(rows_t), tt(rows_m), tt([s.lap for s in subjects]), tt(base), tt(cov),
                 tt([s.suvr[0] for s in subjects]))


def mechanistic_rhs(kappa, alpha, base, capacity, lap):
    """du/dt of the local network FKPP for a batch: kappa, alpha (B,), base (B, N), lap (B, N, N)."""
    def f(u):
        excess = u - base
        return -kappa[:, None] * transport(excess, lap) + alpha[:, None] * excess * (capacity - u)
    return f


def initial_state(theta, batch: Batch):
    return batch.base + theta[:, 2:3] * torch.relu(batch.first - batch.base)


def predict(theta: torch.Tensor, batch: Batch, settings: Settings, correction=None):
    """(trajectory (B, T, N) at batch.times, correction penalty (B,)); theta (B, 3)."""
    mech = mechanistic_rhs(theta[:, 0], theta[:, 1], batch.base, settings.suvr_capacity, batch.lap)
    u0 = initial_state(theta, batch)
    if correction is None:
        dyn = HybridDynamics(mech, None)
        pred = integrate(dyn, u0, batch.times, method="rk4", step_size=settings.dt, t0=batch.times[:, 0],
                         adjoint=settings.adjoint)
        return pred, torch.zeros(batch.size, dtype=pred.dtype, device=pred.device)
    model = ParallelResidual(mech, correction, method="rk4", step_size=settings.dt, adjoint=settings.adjoint)
    return model(u0, batch.times, covariates=batch.cov, lap=batch.lap, t0=batch.times[:, 0])


def misfit(pred: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean squared error over each member's observed visits and regions: (B,)."""
    err = ((pred - batch.obs) ** 2).mean(dim=-1)
    return (err * batch.mask).sum(dim=1) / batch.mask.sum(dim=1).clamp_min(1.0)


def fit_subjects(batch: Batch, settings: Settings, correction=None, init=None, seed=None):
    """Per-subject calibration of theta (kappa, alpha, scale) on each member's observed visits,
    all subjects and restarts in one batched solve per iteration. Returns CalibrationResults.

    Without a correction the fit is memoised per process (``neurohybrid.hybrid.cache``, keyed on
    the batch's tensors, the settings, init and seed): the residual and UDE trainings of a fold
    start from the same mechanistic fits of its training subjects."""
    if correction is None:
        from neurohybrid.hybrid import cache

        return cache.memo("alzheimer.fit_subjects", (batch, settings, init, seed),
                          lambda: _fit_subjects(batch, settings, None, init, seed))
    return _fit_subjects(batch, settings, correction, init, seed)


def _fit_subjects(batch: Batch, settings: Settings, correction=None, init=None, seed=None):
    r = max(1, settings.restarts)
    rep = batch.repeat(r)
    if correction is not None:
        for p in correction.parameters():
            p.requires_grad_(False)

    def loss_fn(theta):
        pred, _ = predict(theta.to(rep.obs.dtype), rep, settings, correction)
        return misfit(pred, rep)

    init = init if init is not None else [settings.prior_centre()] * batch.size
    try:
        return calibrate_gradient_many(loss_fn, settings.bounds(), batch.size, init=init, n_restarts=r,
                                       steps=settings.fit_iterations, lr=settings.fit_learning_rate,
                                       lbfgs_steps=settings.lbfgs_iterations, seed=settings.seed if seed is None else seed,
                                       dtype=batch.obs.dtype, device=batch.obs.device, tol=1e-7)
    finally:
        if correction is not None:
            for p in correction.parameters():
                p.requires_grad_(True)


def laplace_sd(theta: np.ndarray, subject: Subject, settings: Settings, correction=None) -> np.ndarray:
    """Laplace standard deviations of theta for one subject (float64), the noise variance
    estimated from the residuals at the optimum (n_obs - 3 degrees of freedom)."""
    batch = make_batch([subject], settings, None, dtype=torch.float64)
    corr = None
    if correction is not None:
        import copy
        corr = copy.deepcopy(correction).to("cpu", torch.float64)  # the Laplace step runs on the CPU in float64
        for p in corr.parameters():
            p.requires_grad_(False)
    n_obs = int(subject.suvr.size)

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
