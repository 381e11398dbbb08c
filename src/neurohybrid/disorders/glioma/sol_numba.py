"""Numba inference of the glioma solver-in-the-loop forecast (``families.SolForecaster``).

At the demo's 4 mm grid a whole fine forecast costs a few milliseconds, so a forecast that calls
~30 small torch operations per macro step cannot be faster than it: here the coarse set-up runs
without torch. The trained ``GridCorrection`` weights (a per-voxel MLP, ``depth=2``, ReLU) are
evaluated by plain loops on the tumour front, the same formulas as the torch modules (trained and
tested there; tests/disorders/test_glioma_sol.py checks that both paths agree to ~1e-6):

* ``pool_into``: the fine state's 2x2x2 means (edge voxels repeated on odd sizes, as
  ``families._pool``) written into a coarse stepper's padded buffer (0 outside tissue, below TINY);
* ``correct_front``: u <- clamp(u + 4 u (1 - u) * scale * mlp(u, 4 lap, 2 |grad|, wm, gm, consts),
  0, 1) on the voxels with eps < u < 1 - eps in tissue (``CorrectedSolver.correct`` with a
  ``GridCorrection``) gathered only in the bounding box of those voxels (a read-only
  pass finds it), so a sweep costs the front, not the grid;
* ``upsample_front``: the trilinear 2x interpolation (``F.interpolate``, align_corners=False) of
  the coarse state's active box (u > box_eps, padded by one coarse voxel, the interpolation clamped
  at the box's edges as the torch path does on that box) times tissue, computed separably (z, y, x: bit for bit the
  direct formula's products and sums), then optionally the same
  gated MLP correction on the fine grid (the learned upsampler).

All arrays are float32 and C-ordered; scratch buffers are allocated once per subject by the caller.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

TINY = np.float32(1e-15)  # solvers._glioma_kernels.TINY["float32"]


def mlp_weights(correction) -> tuple[np.ndarray, ...]:
    """(W1, b1, W2, b2, W3, b3) float32 of a ``GridCorrection`` (depth 2, ReLU), each W transposed to
    (in, out) so that the kernels' innermost loop runs over a layer's outputs (SIMD)."""
    linear = [m for m in correction.mlp if hasattr(m, "weight")]
    if len(linear) != 3:
        raise ValueError(f"sol_numba supports GridCorrection(depth=2) only, got {len(linear)} linear layers")
    out = []
    for m in linear:
        out += [np.ascontiguousarray(m.weight.detach().cpu().numpy().T, np.float32),
                np.ascontiguousarray(m.bias.detach().cpu().numpy(), np.float32)]
    return tuple(out)


CHUNK = 512  # voxels per dense evaluation (the scratch columns of ``Scratch``)


class Scratch:
    """Per-subject scratch of the chunked MLP evaluation, voxels along the last axis (SIMD):
    features (F, CHUNK), hidden layers (H, CHUNK), outputs, voxel indices."""

    def __init__(self, n_features: int, hidden: int):
        self.x = np.zeros((n_features, CHUNK), np.float32)
        self.h1 = np.zeros((hidden, CHUNK), np.float32)
        self.h2 = np.zeros((hidden, CHUNK), np.float32)
        self.y = np.zeros(CHUNK, np.float32)
        self.ijk = np.zeros((CHUNK, 3), np.int64)

    def args(self):
        return self.x, self.h1, self.h2, self.y, self.ijk


@nb.njit(cache=True, fastmath=True)
def _dense(x, n, w1, b1, w2, b2, w3, b3, h1, h2, y):
    """y[:n] = ReLU MLP of the columns x[:, :n] (w as (in, out)), the voxel loop innermost (SIMD, no
    BLAS: one thread, whatever the BLAS settings). fastmath: reassociation only (no NaN/inf)."""
    zero = np.float32(0)
    n0, n1 = w1.shape
    n2 = w2.shape[1]
    for o in range(n1):
        row = h1[o]
        for v in range(n):
            row[v] = b1[o]
        for i in range(n0):
            w = w1[i, o]
            xi = x[i]
            for v in range(n):
                row[v] += w * xi[v]
        for v in range(n):
            row[v] = max(row[v], zero)
    for v in range(n):
        y[v] = b3[0]
    for o in range(n2):
        row = h2[o]
        for v in range(n):
            row[v] = b2[o]
        for i in range(n1):
            w = w2[i, o]
            hi = h1[i]
            for v in range(n):
                row[v] += w * hi[v]
        w = w3[o, 0]
        for v in range(n):
            y[v] += w * max(row[v], zero)


@nb.njit(cache=True)
def _features(p, i, j, k, x, n):
    """stencil_features of the padded field p at (i, j, k) into x[0:3, n]."""
    uc = p[i, j, k]
    xp, xm = p[i + 1, j, k], p[i - 1, j, k]
    yp, ym = p[i, j + 1, k], p[i, j - 1, k]
    zp, zm = p[i, j, k + 1], p[i, j, k - 1]
    x[0, n] = uc
    x[1, n] = np.float32(4.0) * ((xp + xm + yp + ym + zp + zm) / np.float32(6.0) - uc)
    x[2, n] = math.sqrt((xp - xm) ** 2 + (yp - ym) ** 2 + (zp - zm) ** 2 + np.float32(1e-12))


@nb.njit(cache=True)
def pool_into(u, a, tissue_c, o0, o1, o2):
    """a (padded coarse buffer, interior = coarse voxels o + (0..n)) <- 2x2x2 means of the fine state u
    (indices beyond u's edge repeat its last voxel), 0 outside ``tissue_c`` (coarse interior shape)
    and below TINY."""
    nx, ny, nz = u.shape
    cx, cy, cz = tissue_c.shape
    for i in range(cx):
        for j in range(cy):
            for k in range(cz):
                if not tissue_c[i, j, k]:
                    a[i + 1, j + 1, k + 1] = 0
                    continue
                s = np.float32(0)
                for di in range(2):
                    x = min(2 * (o0 + i) + di, nx - 1)
                    for dj in range(2):
                        y = min(2 * (o1 + j) + dj, ny - 1)
                        for dk in range(2):
                            s += u[x, y, min(2 * (o2 + k) + dk, nz - 1)]
                v = np.float32(0.125) * s
                a[i + 1, j + 1, k + 1] = v if v >= TINY else np.float32(0)


@nb.njit(cache=True)
def correct_front(a, scratch, wm, gm, consts, w1, b1, w2, b2, w3, b3, scale, eps, x, h1, h2, y, ijk):
    """The gated, clamped correction of the padded coarse state a in place (``scratch``: same shape).
    wm, gm: the coarse maps, padded like a; consts: the covariates after wm, gm (D_w, rho on the
    prior unit scale, h / sol_step_days); x, h1, h2, y, ijk: ``Scratch.args()``. Every voxel's
    features are read from the state before the correction. Returns the number of corrected voxels."""
    nx, ny, nz = a.shape
    nc = consts.shape[0]
    one, zero = np.float32(1), np.float32(0)
    chunk = x.shape[1]
    n, total = 0, 0
    # the box of the front voxels (a read-only pass); only there is anything gathered or written
    s0, s1, s2, t0, t1, t2 = nx, ny, nz, 0, 0, 0
    for i in range(1, nx - 1):
        for j in range(1, ny - 1):
            hit = False
            for k in range(1, nz - 1):
                u = a[i, j, k]
                if u > eps and u < one - eps:
                    hit = True
                    s2, t2 = min(s2, k), max(t2, k)
            if hit:
                s0, t0 = min(s0, i), max(t0, i)
                s1, t1 = min(s1, j), max(t1, j)
    lo0, lo1, lo2, hi0, hi1, hi2 = nx, ny, nz, 0, 0, 0  # box of the corrected voxels
    for i in range(s0, t0 + 1):
        for j in range(s1, t1 + 1):
            for k in range(s2, t2 + 1):
                u = a[i, j, k]
                scratch[i, j, k] = -one
                if u <= eps or u >= one - eps or wm[i, j, k] + gm[i, j, k] <= zero:
                    continue
                _features(a, i, j, k, x, n)
                x[3, n] = wm[i, j, k]
                x[4, n] = gm[i, j, k]
                for c in range(nc):
                    x[5 + c, n] = consts[c]
                ijk[n, 0], ijk[n, 1], ijk[n, 2] = i, j, k
                lo0, hi0 = min(lo0, i), max(hi0, i)
                lo1, hi1 = min(lo1, j), max(hi1, j)
                lo2, hi2 = min(lo2, k), max(hi2, k)
                n += 1
                if n == chunk:
                    _gated_update(a, scratch, 0, n, x, w1, b1, w2, b2, w3, b3, h1, h2, y, ijk, scale)
                    total += n
                    n = 0
    if n:
        _gated_update(a, scratch, 0, n, x, w1, b1, w2, b2, w3, b3, h1, h2, y, ijk, scale)
        total += n
    for i in range(lo0, hi0 + 1):
        for j in range(lo1, hi1 + 1):
            for k in range(lo2, hi2 + 1):
                if scratch[i, j, k] >= zero:
                    a[i, j, k] = scratch[i, j, k]
    return total


@nb.njit(cache=True)
def _gated_update(src, dst, off, n, x, w1, b1, w2, b2, w3, b3, h1, h2, y, ijk, scale):
    """dst[v] = clamp(u + 4 u (1 - u) * scale * mlp(x[v]), 0, 1), u = src[v], for the n gathered voxels
    at dst[i, j, k] (ijk[v]), src[i + off, j + off, k + off]."""
    _dense(x, n, w1, b1, w2, b2, w3, b3, h1, h2, y)
    one, zero = np.float32(1), np.float32(0)
    for v in range(n):
        i, j, k = ijk[v, 0], ijk[v, 1], ijk[v, 2]
        u = src[i + off, j + off, k + off]
        dst[i, j, k] = min(max(u + max(np.float32(4.0) * u * (one - u), zero) * (scale * y[v]), zero), one)


@nb.njit(cache=True)
def _active_box(a, eps):
    """Bounding box (lo, hi) in interior coordinates of the padded a's voxels > eps; hi < lo if none."""
    nx, ny, nz = a.shape
    lo = np.array([nx, ny, nz])
    hi = np.array([-1, -1, -1])
    for i in range(1, nx - 1):
        for j in range(1, ny - 1):
            for k in range(1, nz - 1):
                if a[i, j, k] > eps:
                    if i - 1 < lo[0]:
                        lo[0] = i - 1
                    if i - 1 > hi[0]:
                        hi[0] = i - 1
                    if j - 1 < lo[1]:
                        lo[1] = j - 1
                    if j - 1 > hi[1]:
                        hi[1] = j - 1
                    if k - 1 < lo[2]:
                        lo[2] = k - 1
                    if k - 1 > hi[2]:
                        hi[2] = k - 1
    return lo, hi


@nb.njit(cache=True)
def _lin(cbox_lo, cbox_n, f_local):
    """(coarse index a, coarse index b, weight of b) of the box-local trilinear 2x interpolation at
    the fine box-local index f_local (align_corners=False, clamped at the box's edges)."""
    kk = f_local // 2
    if f_local % 2 == 0:
        if kk == 0:
            return cbox_lo, cbox_lo, np.float32(0)
        return cbox_lo + kk - 1, cbox_lo + kk, np.float32(0.75)
    return cbox_lo + kk, cbox_lo + min(kk + 1, cbox_n - 1), np.float32(0.25)


@nb.njit(cache=True)
def upsample_front(a, o0, o1, o2, wm, gm, tissue, p, out, learned, consts, w1, b1, w2, b2, w3, b3, scale, eps, box_eps,
                   x, h1, h2, y, ijk):
    """out (model grid, zero on entry) <- the coarse padded state a (coarse interior offset o in the
    full coarse grid) interpolated onto the model grid on the active box, times tissue (wm + gm > 0),
    then (``learned``) the gated MLP correction. p: padded model-grid scratch, all zero on entry and
    on return. Returns the number of corrected voxels (-1: no active coarse voxel)."""
    lo, hi = _active_box(a, box_eps)
    if hi[0] < lo[0]:
        return -1
    cx, cy, cz = a.shape[0] - 2, a.shape[1] - 2, a.shape[2] - 2
    nx, ny, nz = out.shape
    c0 = np.empty(3, np.int64)
    cn = np.empty(3, np.int64)
    f0 = np.empty(3, np.int64)
    f1 = np.empty(3, np.int64)
    off = (o0, o1, o2)
    lim = (cx, cy, cz)
    full = (nx, ny, nz)
    for d in range(3):
        c0[d] = max(lo[d] - 1, 0)
        c1 = min(hi[d] + 2, lim[d])
        cn[d] = c1 - c0[d]
        f0[d] = 2 * (c0[d] + off[d])
        f1[d] = min(2 * (c1 + off[d]), full[d])
    one, zero = np.float32(1), np.float32(0)
    # separable: along z (on the coarse x-y box), then y, then x, the same products and sums per
    # fine voxel as the direct trilinear formula (bit for bit); x last, only on tissue voxels
    mx, my, mz = f1[0] - f0[0], f1[1] - f0[1], f1[2] - f0[2]
    ka = np.empty(mz, np.int64)
    kb = np.empty(mz, np.int64)
    wk = np.empty(mz, np.float32)
    for k in range(mz):
        ka[k], kb[k], wk[k] = _lin(c0[2], cn[2], k)
    zb = np.empty((cn[0], cn[1], mz), np.float32)
    for ci in range(cn[0]):
        for cj in range(cn[1]):
            row = a[c0[0] + ci + 1, c0[1] + cj + 1]
            for k in range(mz):
                w = wk[k]
                zb[ci, cj, k] = (one - w) * row[ka[k] + 1] + w * row[kb[k] + 1]
    yb = np.empty((cn[0], my, mz), np.float32)
    for ci in range(cn[0]):
        for j in range(my):
            ja, jb, wj = _lin(0, cn[1], j)
            za, zbb = zb[ci, ja], zb[ci, jb]
            for k in range(mz):
                yb[ci, j, k] = (one - wj) * za[k] + wj * zbb[k]
    fx, fy, fz = f0[0], f0[1], f0[2]
    for i in range(mx):
        ia, ib, wi = _lin(0, cn[0], i)
        vi = one - wi
        for j in range(my):
            ya, ybb = yb[ia, j], yb[ib, j]
            # one fine row: branch-free (times the 0/1 tissue row: v * 1 == v, v * 0 == 0 for the
            # finite v >= 0 here) so that the loop vectorises; out and p are zero on entry
            orow, trow = out[fx + i, fy + j, fz:fz + mz], tissue[fx + i, fy + j, fz:fz + mz]
            for k in range(mz):
                orow[k] = (vi * ya[k] + wi * ybb[k]) * trow[k]
            if learned:
                p[fx + i + 1, fy + j + 1, fz + 1:fz + 1 + mz] = orow
    total = 0
    if learned:
        nc = consts.shape[0]
        chunk = x.shape[1]
        n = 0
        for i in range(f0[0], f1[0]):
            for j in range(f0[1], f1[1]):
                for k in range(f0[2], f1[2]):
                    u = p[i + 1, j + 1, k + 1]
                    if u <= eps or u >= one - eps or wm[i, j, k] + gm[i, j, k] <= zero:
                        continue
                    _features(p, i + 1, j + 1, k + 1, x, n)
                    x[3, n] = wm[i, j, k]
                    x[4, n] = gm[i, j, k]
                    for c in range(nc):
                        x[5 + c, n] = consts[c]
                    ijk[n, 0], ijk[n, 1], ijk[n, 2] = i, j, k
                    n += 1
                    if n == chunk:
                        _gated_update(p, out, 1, n, x, w1, b1, w2, b2, w3, b3, h1, h2, y, ijk, scale)
                        total += n
                        n = 0
        if n:
            _gated_update(p, out, 1, n, x, w1, b1, w2, b2, w3, b3, h1, h2, y, ijk, scale)
            total += n
        p[f0[0] + 1:f1[0] + 1, f0[1] + 1:f1[1] + 1, f0[2] + 1:f1[2] + 1] = zero
    return total
