"""Amortised inference (series hybrid): a network maps a subject's observed data to the
mechanistic parameters, then the solver forecasts with them.

The network is trained across the training subjects of a fold, either

* supervised on the per-subject calibrated parameters (``train_supervised``: the targets are
  what ``calibration`` found on each training subject's own data), or
* end-to-end through the solver's torch twin (``train_end_to_end``: the loss is the forecast
  misfit, so the network learns parameters that forecast well rather than ones that fit).

Outputs are mapped into box bounds (``calibration.Bounds``, log space for positive parameters),
so every prediction is a physically valid parameter set. Inputs are standardised with the
training subjects' mean and std (stored in the module's buffers, saved with the checkpoint).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from neurohybrid.hybrid.calibration import Bounds
from neurohybrid.hybrid.training import TrainResult, train_loop


class ParameterNet(nn.Module):
    """MLP: features (B, F) -> parameters (B, P) inside ``bounds``."""

    def __init__(self, n_features: int, bounds: Bounds, hidden: int = 32, depth: int = 2):
        super().__init__()
        self.bounds = bounds
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(max(1, depth - 1)):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, bounds.size))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def fit_scaler(self, features: torch.Tensor) -> None:
        """Standardise inputs with the TRAINING features' statistics."""
        with torch.no_grad():
            self.mean.copy_(features.mean(dim=0))
            self.std.copy_(features.std(dim=0, unbiased=False).clamp_min(1e-6) if features.shape[0] > 1
                           else torch.ones_like(self.std))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net((features - self.mean) / self.std)
        # bounds.to_natural works elementwise on the last axis
        return self.bounds.to_natural(z)

    def state(self) -> dict:
        """Everything needed to rebuild the net (for a checkpoint)."""
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "n_features": int(self.mean.numel()),
            "lower": self.bounds.lower.tolist(),
            "upper": self.bounds.upper.tolist(),
            "log": self.bounds.log.tolist(),
            "hidden": self.net[0].out_features if len(self.net) > 1 else 0,
            "depth": (len(self.net) + 1) // 2,
        }

    @classmethod
    def from_state(cls, state: dict) -> "ParameterNet":
        net = cls(state["n_features"], Bounds(state["lower"], state["upper"], state["log"]),
                  hidden=max(1, state["hidden"]), depth=state["depth"])
        net.load_state_dict(state["state_dict"])
        return net


def train_supervised(net: ParameterNet, features: torch.Tensor, targets: torch.Tensor, **train_kw) -> TrainResult:
    """Regress the calibrated parameters, in the unconstrained (logit/log) space so each parameter
    counts equally whatever its scale."""
    net.fit_scaler(features)
    z_target = torch.as_tensor(np.stack([net.bounds.to_unconstrained(t) for t in targets.detach().cpu().numpy()]),
                               dtype=features.dtype, device=features.device)
    lo, hi = net.bounds._ends(features)

    def loss_fn(idx):
        pred = net(features[idx])
        logmask = torch.as_tensor(net.bounds.log, device=pred.device)
        s = torch.where(logmask, torch.log(pred), pred)
        p = ((s - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        z = torch.log(p / (1 - p))
        return ((z - z_target[idx]) ** 2).mean()

    return train_loop(net, loss_fn, features.shape[0], **train_kw)


def train_end_to_end(net: ParameterNet, features: torch.Tensor,
                     forecast_loss: Callable[[torch.Tensor, Sequence[int]], torch.Tensor], **train_kw) -> TrainResult:
    """Train through the solver: forecast_loss(parameters (len(idx), P), idx) -> scalar misfit of
    the subjects ``idx`` when their forecasts use those parameters."""
    net.fit_scaler(features)

    def loss_fn(idx):
        return forecast_loss(net(features[idx]), idx)

    return train_loop(net, loss_fn, features.shape[0], **train_kw)
