"""The Alzheimer's model settings (``Settings``, resolved by ``neurohybrid.settings``) and their
defaults and fast values for the loader. No torch at import: the workflow checks config keys
against these defaults when it parses the Snakefile."""

from __future__ import annotations

import dataclasses

import numpy as np

from neurohybrid.errors import InputError


@dataclasses.dataclass
class Settings:
    """Every config key the Alzheimer's families read (section ``alzheimer``, falling back to
    ``models`` for the shared ones); see ``from_config``."""

    suvr_baseline: float = 1.0
    baseline_quantile: float = 0.25
    kappa_bounds: tuple[float, float] = (0.005, 1.0)
    alpha_bounds: tuple[float, float] = (0.01, 2.0)
    amplitude_bounds: tuple[float, float] = (0.3, 3.0)
    # where the SOL correction is trained and the SOL families calibrate (log-uniform draws); None:
    # the calibration bounds. Narrower than them in alpha: growth rates of tau-PET studies, and
    # the synthetic cohorts' 0.2-0.8 /yr, lie well inside
    sol_kappa_range: tuple[float, float] | None = (0.01, 1.0)
    sol_alpha_range: tuple[float, float] | None = (0.05, 1.0)
    dt: float = 0.5
    restarts: int = 2
    fit_iterations: int = 40
    fit_learning_rate: float = 0.1
    lbfgs_iterations: int = 5
    epochs: int = 100
    learning_rate: float = 0.01
    theta_learning_rate: float = 0.01
    hidden: int = 16
    embedding_dim: int = 4
    correction_rate: float = 0.3
    rate_penalty: float = 0.05
    residual_penalty: float = 0.01
    weight_decay: float = 0.0
    batch_size: int | None = 1
    val_fraction: float = 0.25
    patience: int | None = 20
    sol_steps: int = 2              # SOL-n: coarse steps unrolled in training
    sol_coarse_dt: float = 1.5      # coarse (semi-implicit) step, years: one step per visit interval
    sol_samples: int = 8            # parameter draws per observed visit of a training subject
    sol_trajectory_steps: int = 4   # coarse steps per fine training trajectory (several horizons)
    sol_batch_size: int = 16        # trajectories per SOL training mini-batch
    sol_weight_power: float = 2.0   # SOL loss weight (coarse one-step error + floor)^-p per trajectory; 0: plain MSE
    amortised_training: str = "end_to_end"
    adjoint: bool = False
    dtype: str = "float32"
    seed: int = 0
    time_limit_s: float | None = None
    torch_threads: int = 1

    @classmethod
    def from_config(cls, config: dict) -> "Settings":
        """``neurohybrid.settings.resolve(config, "alzheimer")`` as a typed object, checked."""
        from neurohybrid.settings import resolve

        values = resolve(config, "alzheimer")
        names = {f.name for f in dataclasses.fields(cls)}
        s = cls(**{k: v for k, v in values.items() if k in names})
        for key in ("kappa_bounds", "alpha_bounds", "amplitude_bounds", "sol_kappa_range", "sol_alpha_range"):
            value = getattr(s, key)
            if value is not None:
                setattr(s, key, tuple(float(x) for x in value))
        if s.amortised_training not in ("end_to_end", "calibrated"):
            raise InputError(f"alzheimer.amortised_training must be end_to_end or calibrated, got {s.amortised_training!r}")
        if not 0.0 <= s.baseline_quantile <= 1.0:
            raise InputError("alzheimer.baseline_quantile must lie in [0, 1]")
        if s.amplitude_bounds[0] <= 0:
            raise InputError("alzheimer.amplitude_bounds must be positive")
        return s

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def bounds(self):
        from neurohybrid.hybrid.calibration import Bounds

        lo = [self.kappa_bounds[0], self.alpha_bounds[0], self.amplitude_bounds[0]]
        hi = [self.kappa_bounds[1], self.alpha_bounds[1], self.amplitude_bounds[1]]
        return Bounds(lo, hi, log=[True, True, True])

    def sol_bounds(self):
        """Where the solver-in-the-loop network is trained, and so where its calibration searches
        (a learned correction is only valid where it was trained): sol_kappa_range /
        sol_alpha_range when set, else the calibration bounds."""
        from neurohybrid.hybrid.calibration import Bounds

        k = self.sol_kappa_range or self.kappa_bounds
        a = self.sol_alpha_range or self.alpha_bounds
        return Bounds([k[0], a[0], self.amplitude_bounds[0]], [k[1], a[1], self.amplitude_bounds[1]], log=[True] * 3)

    def prior_centre(self) -> np.ndarray:
        b = self.bounds()
        return np.sqrt(b.lower * b.upper)

    def train_kw(self) -> dict:
        return dict(epochs=self.epochs, lr=self.learning_rate, weight_decay=self.weight_decay, batch_size=self.batch_size,
                    val_fraction=self.val_fraction, patience=self.patience, seed=self.seed,
                    time_limit_s=self.time_limit_s)


DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "seed"}
# tests / smoke runs: fewer iterations everywhere, same code paths
SLOPPY = dict(epochs=15, fit_iterations=15, restarts=2, lbfgs_iterations=3, sol_samples=2)
