"""Benchmark: one-year glioma growth on the MNI152 GM/WM maps at 1 mm and 2 mm (prints JSON).

Problem (issue 2): D_w = 0.2 mm^2/day, D_g = D_w/10, rho = 0.03/day, 365 days, seed in the left
frontal white matter, Numba with 2 threads, float32 state. Voxel-updates/s are reported twice:
over the cropped grid the kernel actually sweeps (tissue bounding box) and over tissue voxels only.

    .venv/bin/python benchmarks/bench_glioma.py                 # both resolutions
    .venv/bin/python benchmarks/bench_glioma.py --voxel-mm 2    # one resolution
    .venv/bin/python benchmarks/bench_glioma.py --export-maps maps.npz   # for a machine without nibabel
    python benchmarks/bench_glioma.py --maps maps.npz            # ... and run there from that file

Reference: TumorGrowthToolkit (the issue quotes 70-140 s for a comparable one-year run); it is not
on the package index of this workplace, so it was not re-measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

SEED_MNI_MM = (-24.0, 28.0, 22.0)  # left frontal white matter (MNI x<0 is left)


def _block_mean(a, f):
    pad = [(0, (-s) % f) for s in a.shape]
    a = np.pad(a, pad)
    s = a.shape
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def load_maps(voxel_mm):
    """(wm, gm, affine, note) on the template grid at voxel_mm, probabilities in [0, 1]."""
    from neurohybrid.anatomy.templates import load_template

    wm1 = load_template("wm", 1.0)
    gm1 = load_template("gm", 1.0)
    wm, gm = wm1.get_fdata(dtype=np.float32), gm1.get_fdata(dtype=np.float32)
    note = ""
    if max(wm.max(), gm.max()) > 1.0:
        # The shipped 1 mm maps are 0-255; load_template does not rescale them (and its resampled
        # copies clip them to 0/1). Rescale here and build coarser grids by block averaging.
        wm, gm = wm / 255.0, gm / 255.0
        note = "template GM/WM were 0-255: rescaled by 1/255 here"
        if voxel_mm != 1.0:
            f = int(round(voxel_mm))
            wm, gm = _block_mean(wm, f), _block_mean(gm, f)
            affine = wm1.affine.copy()
            affine[:3, :3] *= f
            affine[:3, 3] += (f - 1) / 2.0  # centre of the first block
            note += f"; {voxel_mm} mm grid by {f}x{f}x{f} block mean"
            return _normalise(wm, gm), affine, note
        return _normalise(wm, gm), wm1.affine, note
    wmv, gmv = load_template("wm", voxel_mm), load_template("gm", voxel_mm)
    return _normalise(wmv.get_fdata(dtype=np.float32), gmv.get_fdata(dtype=np.float32)), wmv.affine, note


def _normalise(wm, gm):
    s = np.maximum(wm + gm, 1.0)  # partial-volume sums slightly above 1 after interpolation
    return (wm / s).astype(np.float32), (gm / s).astype(np.float32)


def seed_voxel(wm, affine):
    """The voxel nearest SEED_MNI_MM with WM probability >= 0.9."""
    target = np.linalg.solve(affine, np.r_[SEED_MNI_MM, 1.0])[:3]
    cand = np.argwhere(wm >= 0.9)
    return tuple(int(v) for v in cand[np.argmin(((cand - target) ** 2).sum(axis=1))])


def run(wm, gm, affine, voxel_mm, threads, days, dtype):
    from neurohybrid.solvers.glioma import gaussian_seed, observe, simulate_glioma

    spacing = (voxel_mm,) * 3
    c = seed_voxel(wm, affine)
    u0 = gaussian_seed(wm.shape, spacing, c, sigma_mm=3.0, amplitude=0.8).astype(dtype)
    kw = dict(spacing=spacing, dw=0.2, rho=0.03, dg_ratio=0.1, threads=threads)
    sl = tuple(slice(max(0, x - 8), x + 8) for x in c)  # compile / warm up outside the timing
    simulate_glioma(wm[sl].astype(dtype), gm[sl].astype(dtype), u0[sl], days=2.0, **kw)
    t0 = time.perf_counter()
    u, info = simulate_glioma(wm.astype(dtype), gm.astype(dtype), u0, days=days, return_info=True,
                              **kw)
    wall = time.perf_counter() - t0
    cropped = int(np.prod(info["cropped_shape"]))
    t1gd, flair = observe(u, 0.7, 0.25)
    vox_ml = voxel_mm**3 / 1000.0
    return {
        "voxel_mm": voxel_mm, "grid": list(wm.shape), "dtype": np.dtype(dtype).name,
        "threads": threads, "days": days, "seed_voxel": list(c), "dt_days": info["dt"],
        "steps": info["steps"], "cropped_shape": list(info["cropped_shape"]),
        "cropped_voxels": cropped, "tissue_voxels": info["tissue_voxels"],
        "wall_s": round(wall, 3),
        "voxel_updates_per_s_cropped": cropped * info["steps"] / wall,
        "voxel_updates_per_s_tissue": info["tissue_voxels"] * info["steps"] / wall,
        "flair_volume_ml": float(flair.sum() * vox_ml), "t1gd_volume_ml": float(t1gd.sum() * vox_ml),
        "u_max": float(u.max()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxel-mm", type=float, nargs="*", default=[1.0, 2.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--days", type=float, default=365.0)
    p.add_argument("--float64", action="store_true", help="also time a float64 state")
    p.add_argument("--maps", help="npz written by --export-maps (no nibabel needed)")
    p.add_argument("--export-maps", help="write the maps to this npz and exit")
    a = p.parse_args(argv)

    maps = {}
    if a.maps:
        with np.load(a.maps) as z:
            for v in a.voxel_mm:
                k = f"{v:g}"
                maps[v] = (z[f"wm_{k}"], z[f"gm_{k}"]), z[f"affine_{k}"], str(z[f"note_{k}"])
    else:
        for v in a.voxel_mm:
            maps[v] = load_maps(v)
    if a.export_maps:
        arrays = {}
        for v, ((wm, gm), affine, note) in maps.items():
            k = f"{v:g}"
            arrays.update({f"wm_{k}": wm, f"gm_{k}": gm, f"affine_{k}": affine, f"note_{k}": note})
        np.savez_compressed(a.export_maps, **arrays)
        return 0

    import numba

    results = []
    for v, ((wm, gm), affine, note) in maps.items():
        for dtype in [np.float32] + ([np.float64] if a.float64 else []):
            r = run(wm, gm, affine, v, a.threads, a.days, dtype)
            r["maps_note"] = note
            results.append(r)
    out = {
        "benchmark": "glioma Fisher-Kolmogorov, one year, MNI152 GM/WM",
        "parameters": {"dw_mm2_per_day": 0.2, "dg_ratio": 0.1, "rho_per_day": 0.03,
                       "seed_mni_mm": SEED_MNI_MM},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_avg_1min": os.getloadavg()[0], "numba": numba.__version__,
                    "python": sys.version.split()[0]},
        "voxel_updates": "cropped = tissue bounding box swept by the kernel x steps; tissue = D>0 voxels x steps",
        "reference": {"TumorGrowthToolkit_s": "70-140 (from the issue; not re-measured: the package is "
                                               "not on this workplace's index)"},
        "results": results,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
