"""Tiny 3D networks for the voxel-wise disorders (glioma, stroke), sized for a 2-core demo.

All are fully convolutional (3x3x3 kernels, no pooling), so the same weights run on a small training
box around a lesion and on the whole cropped brain at forecast time. ``GridCorrection`` (the
solver-in-the-loop correction) is a pointwise MLP of a 7-point stencil's features, evaluated on the
tumour front only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """(B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z): `depth` 3x3x3 convolutions of `width` channels.

    The second layer is dilated (receptive field 9 voxels with 3 layers) so a tumour front can see
    the tissue a few voxels ahead. zero_init: the last layer starts at exactly 0, so a correction
    network starts as "no correction".
    """

    def __init__(self, c_in: int, c_out: int, width: int = 8, depth: int = 3, zero_init: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for i in range(max(1, depth - 1)):
            dil = 2 if i == 1 else 1
            layers += [nn.Conv3d(c, width, 3, padding=dil, dilation=dil), nn.Tanh()]
            c = width
        last = nn.Conv3d(c, c_out, 3, padding=1)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def stencil_features(u: torch.Tensor, members=None, voxels=None) -> torch.Tensor:
    """The local shape of a density field in voxel units (no spacing, so the same on any grid):
    u, 4 (mean of the 6 neighbours - u) (a discrete Laplacian, the curvature of the front) and
    2 |central-difference gradient| (its steepness); zero beyond the grid's edge.

    u: (B, X, Y, Z). Returns (B, X, Y, Z, 3), or (V, 3) at the voxels ``voxels`` (flat indices)
    of members ``members`` (gathered, so the cost is that of the V voxels)."""
    b, nx, ny, nz = u.shape
    p = F.pad(u[:, None], (1, 1, 1, 1, 1, 1))[:, 0].reshape(b, -1)
    sx, sy = (ny + 2) * (nz + 2), nz + 2
    if voxels is None:
        members = torch.arange(b, device=u.device).repeat_interleave(nx * ny * nz)
        voxels = torch.arange(nx * ny * nz, device=u.device).repeat(b)
        shape = (b, nx, ny, nz, 3)
    else:
        shape = (-1, 3)
    x, y, z = voxels // (ny * nz), (voxels // nz) % ny, voxels % nz
    c = (x + 1) * sx + (y + 1) * sy + z + 1
    uc = p[members, c]
    xp, xm, yp, ym, zp, zm = (p[members, c + o] for o in (sx, -sx, sy, -sy, 1, -1))
    lap = (xp + xm + yp + ym + zp + zm) / 6.0 - uc
    grad = torch.sqrt((xp - xm) ** 2 + (yp - ym) ** 2 + (zp - zm) ** 2 + 1e-12)  # = 2 |grad u|
    return torch.stack([uc, 4.0 * lap, grad], -1).reshape(shape)


N_STENCIL = 3


class GridCorrection(nn.Module):
    """A correction h(u, covariates) -> du on a grid in the (B, N) interface of ``neurohybrid.hybrid``
    (voxels as the N state variables): a pointwise MLP of the state's local shape
    (``stencil_features``: u, its discrete Laplacian and gradient magnitude in voxel units) and the
    voxel's covariates, which the caller normalises (tissue fractions in [0, 1], parameters by
    their prior ranges, the step size by the training step).

    Evaluated only where the state is "active", eps < u < 1 - eps (``active_eps``): a correction
    gated by u (1 - u) (``hybrid.solver_in_loop.CorrectedSolver``) is below 4 eps elsewhere, and a
    tumour front is a thin shell of the grid, which keeps a correction far cheaper than a CNN over
    the whole brain. Zero outside tissue (``tissue_channels`` of the covariates sum to 0), and the
    last layer starts at 0 (an untrained correction is no correction).

    u: (B, N) (call ``set_shape`` with the grid first) or (B, X, Y, Z); covariates (B or 1, N, C).
    """

    def __init__(self, n_covariates: int, hidden: int = 16, depth: int = 2, tissue_channels=(0, 1), scale: float = 1.0,
                 active_eps: float = 1e-4):
        super().__init__()
        layers: list[nn.Module] = []
        c = N_STENCIL + n_covariates
        for _ in range(depth):
            layers += [nn.Linear(c, hidden), nn.ReLU()]  # ReLU: a tanh cost 10x more at forecast time
            c = hidden
        last = nn.Linear(c, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)
        self.shape = None
        self.tissue_channels = tuple(tissue_channels)
        self.scale = float(scale)
        self.active_eps = float(active_eps)

    def set_shape(self, shape):
        self.shape = tuple(int(s) for s in shape)
        return self

    def forward(self, u, covariates=None, lap=None):
        b = u.shape[0]
        if u.ndim > 2:
            self.shape = tuple(u.shape[1:])
        flat = u.reshape(b, -1)
        active = (flat > self.active_eps) & (flat < 1.0 - self.active_eps)
        if covariates is not None:
            cov = covariates.expand(b, *covariates.shape[-2:])
            active = active & (cov[..., list(self.tissue_channels)].sum(-1) > 0)
        members, voxels = active.nonzero(as_tuple=True)
        out = torch.zeros_like(flat)
        if len(voxels):
            x = stencil_features(flat.reshape(b, *self.shape), members, voxels)
            if covariates is not None:
                x = torch.cat([x, cov[members, voxels]], -1)
            out = out.index_put((members, voxels), self.scale * self.mlp(x)[:, 0])
        return out.reshape(u.shape)


class VoxelCorrection(nn.Module):
    """Pointwise correction (one MLP shared by every voxel) zeroed outside tissue: wraps
    ``neurohybrid.hybrid.neural_ode.RegionwiseMLP`` for the UDE families."""

    def __init__(self, n_covariates: int, hidden: int = 16, tissue_channels=(0, 1), scale: float = 1.0):
        super().__init__()
        from neurohybrid.hybrid.neural_ode import RegionwiseMLP

        self.mlp = RegionwiseMLP(n_covariates=n_covariates, hidden=hidden, use_transport=False, zero_init=True)
        self.tissue_channels = tuple(tissue_channels)
        self.scale = float(scale)

    def forward(self, u, covariates=None, lap=None):
        out = self.mlp(u, covariates, None)
        if covariates is not None:
            tissue = (covariates[..., list(self.tissue_channels)].sum(-1) > 0).to(u.dtype)
            out = out * tissue.expand_as(out)
        return self.scale * out


class ParamNet(nn.Module):
    """Amortised inference: images (B, C, X, Y, Z) of any size -> n_out parameters (normalised).

    Convolutions, then a masked global average over the lesion neighbourhood, then a linear head
    initialised at 0 (so an untrained network predicts the prior mean)."""

    def __init__(self, c_in: int, n_out: int, width: int = 8):
        super().__init__()
        self.features = TinyCNN(c_in, width, width, depth=2, zero_init=False)
        self.head = nn.Linear(width, n_out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        h = torch.tanh(self.features(x)).mean(dim=(2, 3, 4))
        return self.head(h)


def soft_dice_loss(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * (p * m).sum() / (p.sum() + m.sum() + 1e-6)


def flat_covariates(*maps: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) maps -> (1, N, C) covariates in the hybrid library's layout."""
    return torch.stack([m.reshape(-1) for m in maps], dim=-1)[None]
