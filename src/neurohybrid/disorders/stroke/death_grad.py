"""The Xue 2021 tissue death at follow-up as a differentiable function of each voxel's hypoxic
fraction before reperfusion, for training the residual corrections.

Back-propagating through a torch RK4 unroll costs ~5 ms per step on one core whatever the number of
voxels (autograd overhead of ~40 tiny operations per step): 2-3 s per optimiser step for the 480
steps of 120 h at dt 900 s, which left the residual families a handful of steps in the demo's
budget. The model is per voxel and the correction enters only through H before reperfusion, so
D(t_end) is a scalar function of one scalar per voxel: a Numba kernel integrates the state and its
tangent dD/dH_before (the exact derivative of the same discrete RK4 scheme, stage by stage) and
``DeathAtEnd`` wraps it as a torch autograd function. Same time grid as
``families.xue_unroll`` (the torch version: the reference the tests compare both kernels with).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange


def time_edges(rep, end):
    """Sorted segment ends (hours): every voxel's end time and reperfusion time before it."""
    rep = np.asarray(rep, np.float64)
    end = np.asarray(end, np.float64)
    return np.array(sorted(set(np.round(end, 9).tolist()) | set(np.round(rep[rep < end], 9).tolist())), np.float64)


def grid(rep, end, dt_s):
    """(segment start hours, segment end hours, RK4 steps per segment)."""
    edges = time_edges(rep, end)
    starts = np.concatenate([[0.0], edges[:-1]])
    steps = np.array([0 if e <= s else max(1, int(math.ceil((e - s) * 3600.0 / float(dt_s) - 1e-9)))
                      for s, e in zip(starts, edges)], np.int64)
    return starts, edges, steps


@njit(cache=True, inline="always")
def _f(d, tox, hp, kf, kt, kb):
    alive = 1.0 - d
    return kf * tox * alive, (kt * hp - kb * tox * (1.0 - hp)) * alive


@njit(cache=True, inline="always")
def _jf(d, tox, hp, yd, yt, dh, kf, kt, kb):
    """Tangent of the right-hand side: J(d, tox) (yd, yt) + df/dH * dh."""
    alive = 1.0 - d
    a = -kf * tox * yd + kf * alive * yt
    b = (-(kt * hp - kb * tox * (1.0 - hp)) * yd - kb * (1.0 - hp) * alive * yt + (kt + kb * tox) * alive * dh)
    return a, b


@njit(cache=True, parallel=True)
def _kernel(hb, ha, rep, end, starts, ends, steps, kf, kt, kb, out_d, out_g):
    for v in prange(hb.shape[0]):
        d = 0.0
        tox = 0.0
        yd = 0.0
        yt = 0.0
        for s in range(starts.shape[0]):
            t0 = starts[s]
            if end[v] <= t0 + 1e-9 or steps[s] == 0:
                continue
            after = rep[v] <= t0 + 1e-9
            hp = ha[v] if after else hb[v]
            dh = 0.0 if after else 1.0
            h = (ends[s] - t0) * 3600.0 / steps[s]
            for _ in range(steps[s]):
                a1, b1 = _f(d, tox, hp, kf, kt, kb)
                ga1, gb1 = _jf(d, tox, hp, yd, yt, dh, kf, kt, kb)
                d2, t2 = d + 0.5 * h * a1, tox + 0.5 * h * b1
                y2d, y2t = yd + 0.5 * h * ga1, yt + 0.5 * h * gb1
                a2, b2 = _f(d2, t2, hp, kf, kt, kb)
                ga2, gb2 = _jf(d2, t2, hp, y2d, y2t, dh, kf, kt, kb)
                d3, t3 = d + 0.5 * h * a2, tox + 0.5 * h * b2
                y3d, y3t = yd + 0.5 * h * ga2, yt + 0.5 * h * gb2
                a3, b3 = _f(d3, t3, hp, kf, kt, kb)
                ga3, gb3 = _jf(d3, t3, hp, y3d, y3t, dh, kf, kt, kb)
                d4, t4 = d + h * a3, tox + h * b3
                y4d, y4t = yd + h * ga3, yt + h * gb3
                a4, b4 = _f(d4, t4, hp, kf, kt, kb)
                ga4, gb4 = _jf(d4, t4, hp, y4d, y4t, dh, kf, kt, kb)
                d += h / 6.0 * (a1 + 2.0 * a2 + 2.0 * a3 + a4)
                tox += h / 6.0 * (b1 + 2.0 * b2 + 2.0 * b3 + b4)
                yd += h / 6.0 * (ga1 + 2.0 * ga2 + 2.0 * ga3 + ga4)
                yt += h / 6.0 * (gb1 + 2.0 * gb2 + 2.0 * gb3 + gb4)
        out_d[v] = d
        out_g[v] = yd


def death_and_tangent(hb, ha, rep, end, dt_s):
    """(D at each voxel's end time, dD/dH_before) for per-voxel H before / after reperfusion."""
    from neurohybrid.solvers.stroke import XUE2021 as P

    hb = np.ascontiguousarray(hb, np.float64)
    ha = np.ascontiguousarray(ha, np.float64)
    rep = np.ascontiguousarray(rep, np.float64)
    end = np.ascontiguousarray(end, np.float64)
    starts, ends, steps = grid(rep, end, dt_s)
    out_d = np.empty(hb.shape[0])
    out_g = np.empty(hb.shape[0])
    _kernel(hb, ha, rep, end, starts, ends, steps, float(P["kf"]), float(P["kt"]), float(P["kb"]), out_d, out_g)
    return out_d, out_g


class DeathAtEnd(torch.autograd.Function):
    """D(t_end) (V,) of per-voxel H before reperfusion hb (V,) tensor; ha, rep, end: arrays."""

    @staticmethod
    def forward(ctx, hb, ha, rep, end, dt_s):
        d, g = death_and_tangent(hb.detach().cpu().numpy(), ha, rep, end, dt_s)
        ctx.save_for_backward(torch.as_tensor(g, dtype=hb.dtype, device=hb.device))
        return torch.as_tensor(d, dtype=hb.dtype, device=hb.device)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad * g, None, None, None, None


def death_at_end(flow_before, flow_after, wm, rep, end, dt_s):
    """``families.xue_unroll`` without a rate correction, differentiable in flow_before (tensors)."""
    from neurohybrid.solvers.stroke import XUE2021 as P

    mult = 1.0 + (P["wm_factor"] - 1.0) * wm
    hb = torch.sigmoid(-2.0 * (P["k1"] * flow_before * mult + P["k2"]))
    with torch.no_grad():
        ha = torch.sigmoid(-2.0 * (P["k1"] * flow_after * mult + P["k2"])).cpu().numpy()
    return DeathAtEnd.apply(hb, ha, np.asarray(rep, np.float64), np.asarray(end, np.float64), float(dt_s)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# the UDE: learned modulation of the model's rates, per voxel and phase


@njit(cache=True, inline="always")
def _fu(d, tox, hp, gd, gt, kf, kt, kb):
    alive = 1.0 - d
    return kf * tox * alive * (1.0 + gd), (kt * hp * (1.0 + gt) - kb * tox * (1.0 - hp)) * alive


@njit(cache=True, inline="always")
def _jfu(d, tox, hp, gd, gt, yd, yt, pd, pt, kf, kt, kb):
    """Tangent: J (yd, yt) + df/dgd * pd + df/dgt * pt."""
    alive = 1.0 - d
    a = -kf * tox * (1.0 + gd) * yd + kf * alive * (1.0 + gd) * yt + kf * tox * alive * pd
    b = (-(kt * hp * (1.0 + gt) - kb * tox * (1.0 - hp)) * yd - kb * (1.0 - hp) * alive * yt + kt * hp * alive * pt)
    return a, b


@njit(cache=True, parallel=True)
def _ude_kernel(hb, ha, g, rep, end, starts, ends, steps, kf, kt, kb, out_d, out_g):
    """g (V, 4): (gd, gt) before, (gd, gt) after reperfusion; out_g (V, 4): dD_end / dg."""
    for v in prange(hb.shape[0]):
        d = 0.0
        tox = 0.0
        yd = np.zeros(4)
        yt = np.zeros(4)
        for s in range(starts.shape[0]):
            t0 = starts[s]
            if end[v] <= t0 + 1e-9 or steps[s] == 0:
                continue
            after = rep[v] <= t0 + 1e-9
            hp = ha[v] if after else hb[v]
            o = 2 if after else 0
            gd = g[v, o]
            gt = g[v, o + 1]
            h = (ends[s] - t0) * 3600.0 / steps[s]
            for _ in range(steps[s]):
                a1, b1 = _fu(d, tox, hp, gd, gt, kf, kt, kb)
                d2, t2 = d + 0.5 * h * a1, tox + 0.5 * h * b1
                a2, b2 = _fu(d2, t2, hp, gd, gt, kf, kt, kb)
                d3, t3 = d + 0.5 * h * a2, tox + 0.5 * h * b2
                a3, b3 = _fu(d3, t3, hp, gd, gt, kf, kt, kb)
                d4, t4 = d + h * a3, tox + h * b3
                a4, b4 = _fu(d4, t4, hp, gd, gt, kf, kt, kb)
                for q in range(4):
                    pd = 1.0 if q == o else 0.0
                    pt = 1.0 if q == o + 1 else 0.0
                    ga1, gb1 = _jfu(d, tox, hp, gd, gt, yd[q], yt[q], pd, pt, kf, kt, kb)
                    y2d, y2t = yd[q] + 0.5 * h * ga1, yt[q] + 0.5 * h * gb1
                    ga2, gb2 = _jfu(d2, t2, hp, gd, gt, y2d, y2t, pd, pt, kf, kt, kb)
                    y3d, y3t = yd[q] + 0.5 * h * ga2, yt[q] + 0.5 * h * gb2
                    ga3, gb3 = _jfu(d3, t3, hp, gd, gt, y3d, y3t, pd, pt, kf, kt, kb)
                    y4d, y4t = yd[q] + h * ga3, yt[q] + h * gb3
                    ga4, gb4 = _jfu(d4, t4, hp, gd, gt, y4d, y4t, pd, pt, kf, kt, kb)
                    yd[q] += h / 6.0 * (ga1 + 2.0 * ga2 + 2.0 * ga3 + ga4)
                    yt[q] += h / 6.0 * (gb1 + 2.0 * gb2 + 2.0 * gb3 + gb4)
                d += h / 6.0 * (a1 + 2.0 * a2 + 2.0 * a3 + a4)
                tox += h / 6.0 * (b1 + 2.0 * b2 + 2.0 * b3 + b4)
        out_d[v] = d
        for q in range(4):
            out_g[v, q] = yd[q]


class DeathUDE(torch.autograd.Function):
    """D(t_end) (V,) of the rate modulations g (V, 4) tensor; hb, ha, rep, end: arrays."""

    @staticmethod
    def forward(ctx, g, hb, ha, rep, end, dt_s):
        from neurohybrid.solvers.stroke import XUE2021 as P

        starts, ends, steps = grid(rep, end, dt_s)
        gv = np.ascontiguousarray(g.detach().cpu().numpy(), np.float64)
        out_d = np.empty(gv.shape[0])
        out_g = np.empty((gv.shape[0], 4))
        _ude_kernel(np.ascontiguousarray(hb, np.float64), np.ascontiguousarray(ha, np.float64), gv,
                    np.ascontiguousarray(rep, np.float64), np.ascontiguousarray(end, np.float64), starts, ends, steps,
                    float(P["kf"]), float(P["kt"]), float(P["kb"]), out_d, out_g)
        ctx.save_for_backward(torch.as_tensor(out_g, dtype=g.dtype, device=g.device))
        return torch.as_tensor(out_d, dtype=g.dtype, device=g.device)

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad[:, None] * jac, None, None, None, None, None
