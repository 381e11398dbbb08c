"""Numba kernels of the glioma Fisher-Kolmogorov solver (arrays and scalars only).

All kernels work on a cropped grid padded by one voxel on every side, so the stencil loops need no
bounds checks. Scalars (`dt`, `rho`, `one`, ...) must be passed in the dtype of the arrays: a
float64 constant inside a float32 loop would promote the whole expression to float64 and halve
the SIMD width.
"""

from __future__ import annotations

import numba as nb

# Diffusivity stored outside tissue. The face coefficient is max(D_a + D_b, 0) / 2, which is the
# arithmetic mean inside tissue and exactly 0 as soon as one side holds this sentinel (tissue D is
# never larger than ~1e3 mm^2/day). It replaces a branch or a separate mask array in the hot loop:
# one add and one max per face, and one array fewer to stream from memory.
OUTSIDE = -1.0e30

# Densities below TINY[dtype] are set to 0. Explicit diffusion drags a shell of ever smaller values
# ahead of the tumour; products of those values with small face coefficients (a GM voxel with
# P = 1e-4 has D ~ 1e-6) and their squares (logistic term) reach subnormal numbers, whose
# arithmetic is ~100x slower on x86: whole steps crawled (measured 240 ms instead of 17 ms per
# step at 1 mm). With u >= 1e-15, coefficient * (difference of two such u) and u^2 stay normal in
# float32; float64 gets the same margin at 1e-150. 1e-15 of the carrying capacity is ~1e-10 cells
# per mm^3, far below any meaning, and the flushed mass is negligible.
TINY = {"float32": 1.0e-15, "float64": 1.0e-150}


@nb.njit(parallel=True, fastmath=True, cache=True)
def fk_step_iso(u, out, dm, wx, wy, wz, dt, e_r, em1, zero, one, tiny):
    """One split step, written to `out`: explicit Euler diffusion over dt, then the exact logistic
    flow v -> v e / (1 + v (e - 1)) with e = e_r = exp(rho * dt_reaction), em1 = e - 1.

    u, out, dm: (nx, ny, nz), padded; dm holds D inside tissue and OUTSIDE elsewhere.
    wx = 1 / (2 hx^2) etc. (the 1/2 of the arithmetic face mean folded in).
    fastmath is safe here: no NaN/inf can occur (inputs are validated finite, the sentinel sum
    stays far below the float32 range) and reassociation changes results only at rounding level.
    """
    nx, ny, nz = u.shape
    for i in nb.prange(1, nx - 1):
        for j in range(1, ny - 1):
            for k in range(1, nz - 1):
                d = dm[i, j, k]
                uc = u[i, j, k]
                lap = (
                    wx * (max(d + dm[i + 1, j, k], zero) * (u[i + 1, j, k] - uc)
                          + max(d + dm[i - 1, j, k], zero) * (u[i - 1, j, k] - uc))
                    + wy * (max(d + dm[i, j + 1, k], zero) * (u[i, j + 1, k] - uc)
                            + max(d + dm[i, j - 1, k], zero) * (u[i, j - 1, k] - uc))
                    + wz * (max(d + dm[i, j, k + 1], zero) * (u[i, j, k + 1] - uc)
                            + max(d + dm[i, j, k - 1], zero) * (u[i, j, k - 1] - uc))
                )
                v = uc + dt * lap
                new = v * e_r / (one + v * em1)
                out[i, j, k] = new if new >= tiny else zero  # the scheme is monotone: new >= 0


@nb.njit(parallel=True, fastmath=True, cache=True)
def masked_gradients(u, tissue, g, hx, hy, hz, zero, half):
    """Central differences of u restricted to tissue, into g[0..2] (d/dx, d/dy, d/dz).

    A neighbour outside tissue is not used (one-sided difference; none if both are outside), so
    the cross-derivative terms of the tensor scheme never read concentrations outside the brain.
    """
    nx, ny, nz = u.shape
    for i in nb.prange(1, nx - 1):
        for j in range(1, ny - 1):
            for k in range(1, nz - 1):
                if not tissue[i, j, k]:
                    g[0, i, j, k] = zero
                    g[1, i, j, k] = zero
                    g[2, i, j, k] = zero
                    continue
                uc = u[i, j, k]
                g[0, i, j, k] = _one_axis(u[i - 1, j, k], uc, u[i + 1, j, k],
                                          tissue[i - 1, j, k], tissue[i + 1, j, k], hx, zero, half)
                g[1, i, j, k] = _one_axis(u[i, j - 1, k], uc, u[i, j + 1, k],
                                          tissue[i, j - 1, k], tissue[i, j + 1, k], hy, zero, half)
                g[2, i, j, k] = _one_axis(u[i, j, k - 1], uc, u[i, j, k + 1],
                                          tissue[i, j, k - 1], tissue[i, j, k + 1], hz, zero, half)


@nb.njit(inline="always")
def _one_axis(um, uc, up, tm, tp, h, zero, half):
    if tm and tp:
        return half * (up - um) / h
    if tp:
        return (up - uc) / h
    if tm:
        return (uc - um) / h
    return zero


@nb.njit(inline="always")
def _face_flux(ta, tb, tn_a, tn_b, du_normal, ga1, gb1, ga2, gb2, c_n, c_1, c_2, half, zero):
    """Flux across the face between voxels a and b (b = a + e_n), zero unless both are tissue.

    c_n, c_1, c_2: indices of D_nn, D_n1, D_n2 in the 6-component tensor; ga1/gb1, ga2/gb2: the
    tangential derivatives at a and b. Face tensor = arithmetic mean of the two voxel tensors.
    """
    if not (tn_a and tn_b):
        return zero
    dnn = half * (ta[c_n] + tb[c_n])
    dn1 = half * (ta[c_1] + tb[c_1])
    dn2 = half * (ta[c_2] + tb[c_2])
    return dnn * du_normal + dn1 * half * (ga1 + gb1) + dn2 * half * (ga2 + gb2)


# No fastmath: FMA contraction could round the two evaluations of a shared face flux differently
# and break the exact flux antisymmetry that conserves mass.
@nb.njit(parallel=True, cache=True)
def fk_step_tensor(u, out, tens, tissue, g, hx, hy, hz, dt, e_r, em1, zero, one, half, tiny):
    """One split step (as ``fk_step_iso``) with a full diffusion tensor (conservative, with cross
    terms).

    tens: (nx, ny, nz, 6) effective tensor (xx, yy, zz, xy, xz, yz), zero outside tissue;
    g: masked gradients of u from `masked_gradients` (computed for this same u).
    Each face flux is evaluated by one formula with the lower voxel first, so the two voxels of a
    face see bitwise the same flux and total mass is conserved to rounding.
    """
    nx, ny, nz = u.shape
    for i in nb.prange(1, nx - 1):
        for j in range(1, ny - 1):
            for k in range(1, nz - 1):
                if not tissue[i, j, k]:
                    out[i, j, k] = u[i, j, k]
                    continue
                uc = u[i, j, k]
                tc = tens[i, j, k]
                t_c = tissue[i, j, k]
                # x faces: normal xx, cross xy (with d/dy), xz (with d/dz)
                tp = tens[i + 1, j, k]
                tm = tens[i - 1, j, k]
                fxp = _face_flux(tc, tp, t_c, tissue[i + 1, j, k], (u[i + 1, j, k] - uc) / hx,
                                 g[1, i, j, k], g[1, i + 1, j, k], g[2, i, j, k], g[2, i + 1, j, k],
                                 0, 3, 4, half, zero)
                fxm = _face_flux(tm, tc, tissue[i - 1, j, k], t_c, (uc - u[i - 1, j, k]) / hx,
                                 g[1, i - 1, j, k], g[1, i, j, k], g[2, i - 1, j, k], g[2, i, j, k],
                                 0, 3, 4, half, zero)
                tp = tens[i, j + 1, k]
                tm = tens[i, j - 1, k]
                fyp = _face_flux(tc, tp, t_c, tissue[i, j + 1, k], (u[i, j + 1, k] - uc) / hy,
                                 g[0, i, j, k], g[0, i, j + 1, k], g[2, i, j, k], g[2, i, j + 1, k],
                                 1, 3, 5, half, zero)
                fym = _face_flux(tm, tc, tissue[i, j - 1, k], t_c, (uc - u[i, j - 1, k]) / hy,
                                 g[0, i, j - 1, k], g[0, i, j, k], g[2, i, j - 1, k], g[2, i, j, k],
                                 1, 3, 5, half, zero)
                tp = tens[i, j, k + 1]
                tm = tens[i, j, k - 1]
                fzp = _face_flux(tc, tp, t_c, tissue[i, j, k + 1], (u[i, j, k + 1] - uc) / hz,
                                 g[0, i, j, k], g[0, i, j, k + 1], g[1, i, j, k], g[1, i, j, k + 1],
                                 2, 4, 5, half, zero)
                fzm = _face_flux(tm, tc, tissue[i, j, k - 1], t_c, (uc - u[i, j, k - 1]) / hz,
                                 g[0, i, j, k - 1], g[0, i, j, k], g[1, i, j, k - 1], g[1, i, j, k],
                                 2, 4, 5, half, zero)
                div = (fxp - fxm) / hx + (fyp - fym) / hy + (fzp - fzm) / hz
                v = uc + dt * div
                new = v * e_r / (one + v * em1)
                out[i, j, k] = zero if abs(new) < tiny else new  # may undershoot: keep sign


@nb.njit(parallel=True, fastmath=True, cache=True)
def logistic_inplace(u, e_r, em1, one):
    """Exact logistic flow over one reaction sub-step (the half steps of Strang splitting)."""
    flat = u.reshape(-1)
    for n in nb.prange(flat.size):
        v = flat[n]
        flat[n] = v * e_r / (one + v * em1)


@nb.njit(cache=True)
def scale_inplace(u, factor):
    """u *= factor (radiotherapy fraction), without a temporary."""
    flat = u.reshape(-1)
    for n in range(flat.size):
        flat[n] *= factor

