"""`neurohybrid bench [glioma|network|stroke|all|sol]`: solver throughput, and solver-in-the-loop
accuracy at cost, printed as JSON.

Each ``bench_*`` function returns a dict of measured numbers; benchmarks/bench_*.py call them.
Timings exclude Numba compilation (one warm-up call first). Keep default sizes to a few minutes
on a laptop; they are throughput measurements, never tests.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np


def _machine() -> dict:
    import numba

    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "machine": platform.machine(),
    }


def bench_network(weights=None, *, n_sets: int = 1000, years: float = 20.0, n_scipy: int = 20,
                  rtol: float = 1e-6, atol: float = 1e-9, threads: int | None = None, seed: int = 0) -> dict:
    """Global network Fisher-KPP: batched Numba DOPRI5 vs a loop of scipy ``solve_ivp`` (RK45).

    weights: symmetric connectome; default the normative DK-68 from tvb-data. Both integrators use
    the same method family, rtol and atol; outputs at every year. Parameters drawn from the
    literature ranges (kappa 0.02-0.06 /yr, alpha 0.01-0.3 /yr on a max-normalised connectome).
    """
    from scipy.integrate import solve_ivp

    from neurohybrid.solvers.network import laplacian, simulate_network

    source = "given"
    if weights is None:
        from neurohybrid.anatomy.connectomes import normative_connectome

        weights, _names = normative_connectome()
        source = "tvb-data DK-68"
    lap = laplacian(weights)
    n = lap.shape[0]
    rng = np.random.default_rng(seed)
    kappa = rng.uniform(0.02, 0.06, n_sets)
    alpha = rng.uniform(0.01, 0.3, n_sets)
    u0 = np.zeros((n_sets, n))
    seeds = rng.integers(0, n, size=(n_sets, 2))
    u0[np.arange(n_sets)[:, None], seeds] = rng.uniform(0.05, 0.2, (n_sets, 2))
    t_eval = np.arange(0.0, years + 1e-9, 1.0)

    simulate_network(lap, u0[:4], t_eval, kappa=kappa[:4], alpha=alpha[:4], rtol=rtol, atol=atol, threads=threads)
    start = time.perf_counter()
    numba_out = simulate_network(lap, u0, t_eval, kappa=kappa, alpha=alpha, rtol=rtol, atol=atol, threads=threads)
    numba_s = time.perf_counter() - start

    n_scipy = min(n_scipy, n_sets)
    start = time.perf_counter()
    ref = []
    for b in range(n_scipy):
        k, a = kappa[b], alpha[b]
        sol = solve_ivp(lambda _t, u, k=k, a=a: -k * (lap @ u) + a * u * (1.0 - u), (0.0, years), u0[b],
                        method="RK45", t_eval=t_eval, rtol=rtol, atol=atol)
        ref.append(sol.y.T)
    scipy_s = time.perf_counter() - start
    ref = np.asarray(ref)
    per_numba = numba_s / n_sets
    per_scipy = scipy_s / n_scipy
    return {
        "benchmark": "network_fkpp",
        "connectome": source,
        "regions": n,
        "parameter_sets": n_sets,
        "years": years,
        "rtol": rtol,
        "atol": atol,
        "numba_seconds": numba_s,
        "numba_solves_per_s": n_sets / numba_s,
        "scipy_solves_timed": n_scipy,
        "scipy_solves_per_s": n_scipy / scipy_s,
        "speedup_per_solve": per_scipy / per_numba,
        "max_abs_diff_vs_scipy": float(np.abs(numba_out[:n_scipy] - ref).max()),
        **_machine(),
    }


def bench_stroke(shape=(64, 64, 48), *, hours: float = 24.0, reperfusion_h: float = 6.0, threads: int | None = None,
                 seed: int = 0) -> dict:
    """Per-voxel Xue 2021 tissue-death model on a synthetic CBF map: voxel-hours per second."""
    from neurohybrid.solvers.stroke import simulate_tissue_death

    rng = np.random.default_rng(seed)
    cbf = rng.uniform(0.0, 60.0, shape)
    wm = rng.uniform(0.0, 1.0, shape)
    simulate_tissue_death(cbf[:2, :2, :2], hours=1.0, wm_fraction=wm[:2, :2, :2], threads=threads)
    start = time.perf_counter()
    res = simulate_tissue_death(cbf, hours=hours, reperfusion_h=reperfusion_h, wm_fraction=wm, threads=threads)
    seconds = time.perf_counter() - start
    voxels = int(np.prod(shape))
    return {
        "benchmark": "stroke_tissue_death",
        "voxels": voxels,
        "hours": hours,
        "seconds": seconds,
        "voxel_hours_per_s": voxels * hours / seconds,
        "dead_fraction_mean": float(res["dead"].mean()),
        **_machine(),
    }


GLIOMA_SEED_MNI_MM = (-24.0, 28.0, 22.0)  # left frontal white matter, as benchmarks/bench_glioma.py


def bench_glioma(voxel_mm: float = 2.0, days: float = 365.0, *, threads: int | None = None) -> dict:
    """Fisher-Kolmogorov glioma growth on the MNI152 GM/WM maps at voxel_mm: voxel-days per second.

    D_w = 0.2 mm^2/day, D_g = D_w/10, rho = 0.03/day, float32 state, seed in the left frontal WM.
    """
    from neurohybrid.anatomy.templates import load_template
    from neurohybrid.solvers.glioma import gaussian_seed, simulate_glioma

    wm_img = load_template("wm", voxel_mm)
    wm = np.asarray(wm_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(load_template("gm", voxel_mm).get_fdata(), dtype=np.float32)
    total = wm + gm
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-12), 1.0).astype(np.float32)  # resampling may push the sum over 1
    wm, gm = np.clip(wm * scale, 0, 1), np.clip(gm * scale, 0, 1)
    spacing = (voxel_mm,) * 3
    center = np.linalg.solve(wm_img.affine, [*GLIOMA_SEED_MNI_MM, 1.0])[:3]
    u0 = gaussian_seed(wm.shape, spacing, tuple(center), sigma_mm=3.0).astype(np.float32)
    # compile on a small block around the seed (the timed run then excludes Numba compilation)
    block = tuple(slice(max(0, int(c) - 6), int(c) + 6) for c in center)
    simulate_glioma(wm[block], gm[block], u0[block], spacing=spacing, days=1.0, threads=threads)
    start = time.perf_counter()
    u = simulate_glioma(wm, gm, u0, spacing=spacing, dw=0.2, rho=0.03, days=days, threads=threads)
    seconds = time.perf_counter() - start
    tissue = int((total > 0.1).sum())
    return {
        "benchmark": "glioma_fk",
        "voxel_mm": voxel_mm,
        "grid": list(wm.shape),
        "tissue_voxels": tissue,
        "days": days,
        "seconds": seconds,
        "tissue_voxel_days_per_s": tissue * days / seconds,
        "tumour_volume_ml_u_gt_0.25": float((u > 0.25).sum() * voxel_mm**3 / 1000.0),
        **_machine(),
    }


SOL_DISORDERS = ("glioma", "alzheimer", "stroke")


def bench_sol(disorders=SOL_DISORDERS, *, quick: bool = False, seed: int = 0) -> list[dict]:
    """Solver-in-the-loop as a neural-accelerated solver, per disorder: on held-out cases, the error
    against the fine solver and the wall time of fine, coarse, coarse + SOL-n and coarse +
    pre-computed, and the speed-up at equal accuracy (each disorder's ``sol_bench.run``)."""
    import importlib

    out = []
    for disorder in disorders:
        module = importlib.import_module(f"neurohybrid.disorders.{disorder}.sol_bench")
        start = time.perf_counter()
        result = module.run(quick=quick, seed=seed)
        out.append({"benchmark": "solver_in_the_loop", **result, "quick": quick, "seed": seed,
                    "wall_seconds": time.perf_counter() - start, **_machine()})
    return out


def _run(args) -> int:
    if args.which == "sol":
        results = bench_sol(args.disorder or SOL_DISORDERS, quick=args.quick, seed=args.seed)
        json.dump(results[0] if len(results) == 1 else results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    which = ["glioma", "network", "stroke"] if args.which == "all" else [args.which]
    results = []
    for name in which:
        if name == "network":
            results.append(bench_network(n_sets=args.sets, years=args.years, threads=args.threads))
        elif name == "stroke":
            results.append(bench_stroke(tuple(args.stroke_shape), hours=args.hours, threads=args.threads))
        else:
            results.append(bench_glioma(args.voxel_mm, args.days, threads=args.threads))
    json.dump(results[0] if len(results) == 1 else results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure solver throughput and print JSON",
        description="Solver benchmarks (Numba compilation excluded). network: Fisher-KPP solves/s for many "
        "parameter sets on the normative DK-68 connectome vs scipy solve_ivp; stroke: voxel-hours/s; "
        "glioma: tissue voxel-days/s for one year on the MNI template (all: these three). sol: the "
        "solver-in-the-loop families as accelerated solvers, per disorder: error vs the fine solver "
        "and wall time of fine, coarse and corrected coarse on held-out cases (trains first; minutes).",
    )
    parser.add_argument("which", nargs="?", default="all", choices=["glioma", "network", "stroke", "all", "sol"])
    parser.add_argument("--disorder", action="append", choices=list(SOL_DISORDERS),
                        help="sol: only this disorder (repeatable; default all three)")
    parser.add_argument("--quick", action="store_true", help="sol: small cases and short training (seconds)")
    parser.add_argument("--seed", type=int, default=0, help="sol: seed of the cases and the training")
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    parser.add_argument("--sets", type=int, default=1000, help="network: parameter sets (default 1000)")
    parser.add_argument("--years", type=float, default=20.0, help="network: simulated years (default 20)")
    parser.add_argument("--stroke-shape", type=int, nargs=3, default=[64, 64, 48], metavar=("X", "Y", "Z"),
                        help="stroke: voxel grid of the synthetic CBF map (default 64 64 48)")
    parser.add_argument("--hours", type=float, default=24.0, help="stroke: simulated hours (default 24)")
    parser.add_argument("--voxel-mm", type=float, default=2.0, help="glioma: grid spacing in mm (default 2)")
    parser.add_argument("--days", type=float, default=365.0, help="glioma: simulated days (default 365)")
    parser.set_defaults(func=_run)
