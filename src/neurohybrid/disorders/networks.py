"""Tiny 3D networks for the voxel-wise disorders (glioma, stroke), sized for a 2-core demo.

All are fully convolutional (3x3x3 kernels, no pooling), so the same weights run on a small training
box around a lesion and on the whole cropped brain at forecast time.
"""

from __future__ import annotations

import torch
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


class GridCorrection(nn.Module):
    """A correction g(u, covariates, lap) -> du in the (B, N) interface of ``neurohybrid.hybrid``
    (voxels as the N state variables) computed by a 3D CNN on the grid.

    covariates: (B, N, C) voxel covariates (tissue maps first: channel `tissue_channels` sum > 0
    marks tissue); the output is zero outside tissue so the hybrid never creates density there.
    Call ``set_shape`` with the grid shape before use.
    """

    def __init__(self, n_covariates: int, width: int = 8, depth: int = 3, tissue_channels=(0, 1), scale: float = 1.0):
        super().__init__()
        self.cnn = TinyCNN(1 + n_covariates, 1, width, depth, zero_init=True)
        self.shape = None
        self.tissue_channels = tuple(tissue_channels)
        self.scale = float(scale)

    def set_shape(self, shape):
        self.shape = tuple(int(s) for s in shape)
        return self

    def forward(self, u, covariates=None, lap=None):
        b = u.shape[0]
        if u.ndim > 2:
            self.shape = tuple(u.shape[1:])
        x = u.reshape(b, 1, *self.shape)
        if covariates is not None:
            cov = covariates.expand(b, *covariates.shape[-2:])
            x = torch.cat([x, cov.transpose(1, 2).reshape(b, -1, *self.shape)], dim=1)
            tissue = (cov[..., list(self.tissue_channels)].sum(-1) > 0).to(u.dtype)
        else:
            tissue = torch.ones(b, x[0, 0].numel(), dtype=u.dtype, device=u.device)
        out = self.scale * self.cnn(x).reshape(b, -1) * tissue
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
