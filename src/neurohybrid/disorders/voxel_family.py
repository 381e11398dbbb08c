"""What the model families of the voxel-wise disorders (glioma, stroke) share.

``VoxelFamily``: settings, torch threads, float32 tensors on the family's device and the
``hybrid.training.train_loop`` options. The training of the networks both disorders use the same
way: a mask CNN added to "no change" logits (``train_mask_cnn``, data_driven), a parameter network
regressed onto calibrated labels (``train_param_net``, amortised) and the corrected coarse solver
(``train_corrected_solver``, sol / sol_precomputed).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from neurohybrid.disorders import voxel
from neurohybrid.disorders.base import Family
from neurohybrid.disorders.networks import soft_dice_loss
from neurohybrid.errors import InputError


def check_trained(trained, name: str) -> None:
    if not trained or "state_dict" not in trained:
        raise InputError(f"family {name} needs a trained checkpoint with a state_dict")


class VoxelFamily(Family):
    """Subclasses give ``settings(config)``: the disorder's settings dict (``neurohybrid.settings.resolve``)."""

    def __init__(self, config, device):
        super().__init__(config, device)
        self.s = self.settings(config)
        if int(self.s["torch_threads"]) > 0:
            # one intra-op thread per job by default: the workflow runs jobs side by side, and on
            # a busy 2-core machine 2 threads per job made training ~4x slower than 1
            torch.set_num_threads(int(self.s["torch_threads"]))

    @staticmethod
    def settings(config: dict) -> dict:
        raise NotImplementedError

    @property
    def seed(self) -> int:
        return int((self.config or {}).get("seed", 0))

    def tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)

    def train_kw(self, s=None) -> dict:
        s = s or self.s
        return dict(epochs=int(s["epochs"]), lr=float(s["learning_rate"]), time_limit_s=voxel.optional_float(s["time_limit_s"]),
                    batch_size=None if s["batch_size"] is None else int(s["batch_size"]),
                    val_fraction=float(s["val_fraction"]), patience=None if s["patience"] is None else int(s["patience"]),
                    seed=self.seed)


def train_mask_cnn(net, items, train_kw: dict) -> list[float]:
    """Train ``net`` so that sigmoid(net(x) + prior) matches the masks y (BCE + soft Dice), for items
    (x, prior logits, y) of (1, C, X, Y, Z) tensors. Returns the loss history."""
    from neurohybrid.hybrid.training import train_loop

    def loss_fn(idx):
        total = 0.0
        for i in idx:
            x, prior, y = items[i]
            logits = net(x) + prior
            total = total + F.binary_cross_entropy_with_logits(logits, y) + soft_dice_loss(torch.sigmoid(logits), y)
        return total / len(idx)

    return train_loop(net, loss_fn, len(items), **train_kw).history


def train_param_net(net, xs, ys, train_kw: dict) -> list[float]:
    """Regress ``net(xs[i])`` onto the labels ``ys[i]`` (mean squared error). Returns the loss history."""
    from neurohybrid.hybrid.training import train_loop

    def loss_fn(idx):
        return sum(((net(xs[i]) - ys[i]) ** 2).mean() for i in idx) / len(idx)

    kw = dict(train_kw)
    kw["epochs"] = 4 * kw["epochs"]  # a handful of scalars: cheap epochs
    return train_loop(net, loss_fn, len(xs), **kw).history


def train_corrected_solver(model, fine, covariates, s: dict, train_kw: dict, *, precomputed: bool) -> dict:
    """Train a ``hybrid.solver_in_loop.CorrectedSolver``'s correction on fine trajectories (one-step
    targets or ``sol_steps`` unrolled steps), validated with a fall-back to the plain coarse solver
    (``fit_correction``). Returns the checkpoint dict (with the settings)."""
    from neurohybrid.hybrid.solver_in_loop import fit_correction

    out = fit_correction(model, fine, covariates, precomputed=precomputed, n_unroll=int(s["sol_steps"]), **train_kw)
    return dict(out, settings=s)
