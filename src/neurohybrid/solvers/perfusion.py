"""One-compartment Darcy perfusion on a voxel grid, for occlusion scenarios.

Inside the brain mask we solve for a capillary-bed pressure p (dimensionless units in which
beta (p - p_v) is a flow in ml/100 ml/min):

    -div(K grad p) + beta (p - p_v) = s,        zero flux across the mask border,

* s: arterial inflow per voxel, s = s_tissue * scale(territory): s_tissue = 56 GM + 21 WM (the
  normal CBF of the voxel's tissue mix; 56 where no tissue maps are given) and scale the inflow
  factor of the voxel's arterial territory (1 = patent, 0 = fully occluded);
* beta (per minute): exchange into the venous compartment; CBF = beta (p - p_v);
* K (mm^2/min, scalar or per voxel): lets blood redistribute between neighbouring voxels
  (a crude stand-in for leptomeningeal collaterals); sqrt(K / beta) is the collateral length
  (default K = 1 mm^2/min, beta = 1 /min: 1 mm, so healthy maps stay close to 56 / 21).

With K = 0 the CBF equals s exactly, so a healthy brain is calibrated by construction (GM ~ 56,
WM ~ 21, smoothed over sqrt(K/beta) mm by the Darcy term); the solver integrates
sum(CBF) = sum(s) exactly (flux-conservative finite volumes), so occluding a territory lowers
CBF there and neighbouring tissue supplies part of it. The matrix is symmetric positive
definite: scipy.sparse spsolve for small grids, conjugate gradients (Jacobi preconditioned) for
larger ones. We assemble the 7-point finite-volume operator by hand because scipy has only the
sparse algebra, not a masked variable-coefficient stencil builder.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from neurohybrid.errors import InputError
from neurohybrid.solvers.stroke import NORMAL_CBF_GM, NORMAL_CBF_WM


def _field(value, shape, name, *, lo=None):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(shape, float(arr))
    if arr.shape != tuple(shape):
        raise InputError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} has NaN or infinite values")
    if lo is not None and np.any(arr < lo):
        raise InputError(f"{name} must be >= {lo}")
    return arr


def inflow_scale_map(inflow_territory, inflow_scale, shape) -> np.ndarray:
    """Per-voxel inflow factor from a territory map.

    inflow_territory: None (all patent), a boolean mask (scaled by the scalar inflow_scale), or an
    integer label map with inflow_scale a dict {label: factor} (labels not listed keep 1).
    """
    if inflow_territory is None:
        return np.ones(shape)
    terr = np.asarray(inflow_territory)
    if terr.shape != tuple(shape):
        raise InputError(f"inflow territory has shape {terr.shape}, expected {tuple(shape)}")
    scale = np.ones(shape)
    if isinstance(inflow_scale, dict):
        for label, factor in inflow_scale.items():
            scale[terr == label] = float(factor)
    else:
        scale[terr.astype(bool)] = float(inflow_scale)
    if np.any(scale < 0) or not np.all(np.isfinite(scale)):
        raise InputError("inflow scale factors must be finite and >= 0")
    return scale


def darcy_operator(mask, permeability, beta, spacing):
    """Sparse matrix of -div(K grad .) + beta on the voxels of mask (flattened in C order of mask)."""
    mask = np.asarray(mask, dtype=bool)
    index = -np.ones(mask.shape, dtype=np.int64)
    index[mask] = np.arange(int(mask.sum()))
    n = int(mask.sum())
    K = permeability
    beta_v = beta[mask] if np.ndim(beta) else np.full(n, float(beta))
    rows, cols, vals = [], [], []
    diag = beta_v.astype(np.float64).copy()
    for axis in range(3):
        h2 = float(spacing[axis]) ** 2
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        both = mask[lo] & mask[hi]
        k_a = K[lo][both]
        k_b = K[hi][both]
        # harmonic mean: a face with zero permeability on either side passes nothing
        with np.errstate(divide="ignore", invalid="ignore"):
            k_face = np.where((k_a > 0) & (k_b > 0), 2.0 * k_a * k_b / (k_a + k_b), 0.0) / h2
        ia = index[lo][both]
        ib = index[hi][both]
        np.add.at(diag, ia, k_face)
        np.add.at(diag, ib, k_face)
        rows += [ia, ib]
        cols += [ib, ia]
        vals += [-k_face, -k_face]
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def darcy_perfusion(mask, permeability=1.0, inflow_territory=None, inflow_scale=1.0, *, gm=None, wm=None,
                    spacing=(1.0, 1.0, 1.0), beta=1.0, cbf_gm=NORMAL_CBF_GM, cbf_wm=NORMAL_CBF_WM,
                    solver="auto", tol=1e-10) -> np.ndarray:
    """CBF map (ml/100 ml/min) of the one-compartment Darcy model; 0 outside mask.

    mask: brain mask (3D). permeability: K in mm^2/min (scalar or map). inflow_territory /
    inflow_scale: see ``inflow_scale_map``. gm, wm: tissue probabilities setting the normal
    inflow 56 GM + 21 WM (if both None, 56 everywhere). beta: venous exchange per minute.
    solver: "spsolve", "cg" or "auto" (spsolve below 20,000 voxels).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise InputError(f"mask must be 3D, got shape {mask.shape}")
    if not mask.any():
        raise InputError("brain mask is empty")
    shape = mask.shape
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    K = _field(permeability, shape, "permeability", lo=0.0)
    beta = float(beta)
    if not beta > 0:
        raise InputError(f"beta must be > 0 per minute, got {beta}")
    if gm is None and wm is None:
        normal = np.full(shape, float(cbf_gm))
    else:
        g = _field(0.0 if gm is None else gm, shape, "gm", lo=0.0)
        w = _field(0.0 if wm is None else wm, shape, "wm", lo=0.0)
        if np.any(g > 1 + 1e-6) or np.any(w > 1 + 1e-6):
            raise InputError("tissue probabilities must lie in [0, 1]")
        normal = cbf_gm * g + cbf_wm * w
    source = normal * inflow_scale_map(inflow_territory, inflow_scale, shape)
    A = darcy_operator(mask, K, beta, spacing)
    b = source[mask]
    n = b.size
    if solver == "auto":
        solver = "spsolve" if n < 20000 else "cg"
    if solver == "spsolve":
        excess = spla.spsolve(A.tocsc(), b)
    elif solver == "cg":
        precond = sp.diags(1.0 / A.diagonal())
        excess, info = spla.cg(A, b, rtol=tol, atol=0.0, M=precond, maxiter=10 * n)
        if info != 0:
            raise RuntimeError(f"conjugate gradients did not converge (info={info})")
    else:
        raise ValueError(f"solver must be 'auto', 'spsolve' or 'cg', got {solver!r}")
    cbf = np.zeros(shape)
    cbf[mask] = beta * excess  # p - p_v solves the system; CBF = beta (p - p_v)
    return cbf
