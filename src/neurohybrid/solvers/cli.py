"""`neurohybrid simulate {glioma,alzheimer,stroke}`: run one forward model from files.

Every input is validated before anything is computed; outputs are written atomically, so a
failing run leaves no output file.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from neurohybrid.errors import InputError

SEED_TISSUE_MIN = 0.25  # wm + gm at the seed voxel: below this the seed is not in brain tissue
CBF_MAX = 300.0  # ml/100 ml/min; larger values mean wrong units, not hyperaemia
# Work budgets (``--max-steps``): a run that would take more stops before it starts. Grids count
# voxel-steps: 1e11 is about 1-3 minutes at the measured ~0.7-1.4e9 voxel-updates/s (README,
# "Solvers"); the network counts estimated solver steps, each over the whole graph.
GRID_STEP_BUDGET = 1e11
NETWORK_STEP_BUDGET = 1e7
NIFTI = (".nii.gz", ".nii")


def _check_out(path: Path, suffixes) -> None:
    """Refuse an --out the run could not write, before any work (the write itself is atomic)."""
    if path.is_dir():
        raise InputError("--out is a directory; give a file name", file=path)
    if not any(path.name.endswith(sfx) for sfx in suffixes):
        raise InputError(f"--out must end in {' or '.join(suffixes)}", file=path)
    if not path.parent.is_dir():
        raise InputError("the folder of --out does not exist", file=path)


def _check_budget(work: float, budget: float, what: str) -> None:
    if not work <= budget:  # also catches inf / nan
        raise InputError(f"this run needs about {work:.3g} {what}, more than --max-steps {budget:.3g}; "
                         f"check the arguments, or raise --max-steps to allow it")


def _check_threads(threads) -> None:
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")


def _positive(name, value, *, allow_zero=False):
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# glioma


def world_to_voxel(affine, xyz_mm) -> np.ndarray:
    """Continuous voxel coordinates of a world point (mm) through the inverse affine."""
    return (np.linalg.inv(affine) @ np.array([*map(float, xyz_mm), 1.0]))[:3]


def _run_glioma(args) -> int:
    from nibabel.affines import voxel_sizes

    from neurohybrid.io import check_same_grid, load_volume, save_volume
    from neurohybrid.solvers.glioma import _bbox, gaussian_seed, simulate_glioma, stable_dt

    _check_out(args.out, NIFTI)
    _check_threads(args.threads)
    wm, wm_aff = load_volume(args.wm, value_range=(0.0, 1.0))
    gm, gm_aff = load_volume(args.gm, value_range=(0.0, 1.0))
    check_same_grid((args.wm, wm, wm_aff), (args.gm, gm, gm_aff))
    tissue = wm + gm
    if not np.any(tissue > 0):
        raise InputError("empty brain: WM and GM maps are zero everywhere", file=args.wm)
    if np.any(tissue > 1.05):
        raise InputError(f"WM + GM exceeds 1 (max {tissue.max():.3g}); the maps must be probabilities", file=args.gm)
    _positive("dw", args.dw)
    _positive("rho", args.rho, allow_zero=True)
    _positive("days", args.days)
    _positive("dg-ratio", args.dg_ratio, allow_zero=True)
    _positive("seed-sigma-mm", args.seed_sigma_mm)
    if not all(math.isfinite(v) for v in args.seed_mm):
        raise InputError(f"--seed-mm must be finite, got {args.seed_mm}")
    center = world_to_voxel(wm_aff, args.seed_mm)
    index = tuple(int(i) for i in np.rint(center))
    if any(i < 0 or i >= n for i, n in zip(index, wm.shape)):
        raise InputError(f"seed {tuple(args.seed_mm)} mm maps to voxel {index}, outside the image {wm.shape}",
                         file=args.wm)
    if tissue[index] < SEED_TISSUE_MIN:
        raise InputError(f"seed {tuple(args.seed_mm)} mm (voxel {index}) is outside brain tissue "
                         f"(WM + GM = {tissue[index]:.2f} < {SEED_TISSUE_MIN})", file=args.wm)
    spacing = tuple(float(s) for s in voxel_sizes(wm_aff))
    dmax = args.dw * float((wm + args.dg_ratio * gm).max())
    steps = math.ceil(args.days / stable_dt(dmax, spacing, args.rho))
    box_voxels = math.prod(sl.stop - sl.start for sl in _bbox(tissue > 0))
    _check_budget(float(steps) * box_voxels, args.max_steps,
                  f"voxel-steps ({steps:.3g} stable steps of the {box_voxels}-voxel tissue box)")
    u0 = gaussian_seed(wm.shape, spacing, tuple(center), sigma_mm=args.seed_sigma_mm)
    u = simulate_glioma(wm, gm, u0, spacing=spacing, dw=args.dw, rho=args.rho, days=args.days,
                        dg_ratio=args.dg_ratio, threads=args.threads)
    save_volume(args.out, np.asarray(u, dtype=np.float32), wm_aff)
    return 0


# ---------------------------------------------------------------------------------------------
# Alzheimer's disease


def output_times(years, dt_years) -> np.ndarray:
    """0, dt, 2 dt, ... and always the final time ``years``."""
    n = int(math.floor(years / dt_years + 1e-9))
    times = np.arange(n + 1) * dt_years
    if years - times[-1] > 1e-9 * max(1.0, years):
        times = np.append(times, years)
    return times


def _run_alzheimer(args) -> int:
    import pandas as pd

    from neurohybrid.io import write_tsv
    from neurohybrid.io.tsv import read_connectome
    from neurohybrid.solvers.network import laplacian, simulate_network, spectral_radius_bound

    _check_out(args.out, (".tsv",))
    _check_threads(args.threads)
    weights, names = read_connectome(args.connectome)
    if not np.any(weights - np.diag(np.diag(weights)) > 0):
        raise InputError("connectome has no connections between regions", file=args.connectome)
    seeds = [s.strip() for s in args.seed_regions.split(",") if s.strip()]
    if not seeds:
        raise InputError("--seed-regions is empty")
    unknown = [s for s in seeds if s not in names]
    if unknown:
        raise InputError(f"unknown region name(s) {', '.join(unknown)} (not in the connectome header)",
                         file=args.connectome)
    _positive("kappa", args.kappa, allow_zero=True)
    if not math.isfinite(args.alpha):
        raise InputError(f"--alpha must be finite, got {args.alpha}")
    _positive("years", args.years)
    _positive("dt-years", args.dt_years)
    if not (0 < args.seed_value <= 1):
        raise InputError(f"--seed-value must lie in (0, 1], got {args.seed_value}")
    lap = laplacian(weights)
    # DOPRI5 is explicit: at least years * (largest rate) / 3.3 steps (its stability interval),
    # and one output row per --dt-years
    rate = args.kappa * spectral_radius_bound(lap) + abs(args.alpha)
    steps = max(args.years * rate / 3.3, args.years / args.dt_years)
    _check_budget(steps, args.max_steps, "solver steps or output rows")
    u0 = np.zeros(len(names))
    u0[[names.index(s) for s in seeds]] = args.seed_value
    times = output_times(args.years, args.dt_years)
    traj = simulate_network(lap, u0, times, kappa=args.kappa, alpha=args.alpha, model=args.model,
                            threads=args.threads)[0]
    frame = pd.DataFrame(traj, columns=names)
    frame.insert(0, "time", times)
    write_tsv(args.out, frame, float_format="%.10g")
    return 0


# ---------------------------------------------------------------------------------------------
# stroke


def _run_stroke(args) -> int:
    from neurohybrid.io import check_same_grid, load_volume, save_volume
    from neurohybrid.solvers.stroke import MAX_DT_S, RK4_STABILITY, XUE2021, simulate_tissue_death

    _check_out(args.out, NIFTI)
    _check_threads(args.threads)
    _positive("dt-s", args.dt_s)
    if args.dt_s > MAX_DT_S:
        raise InputError(f"--dt-s {args.dt_s:g} s exceeds {MAX_DT_S:g} s, the largest RK4 step whose accuracy was "
                         f"checked (RK4 is unstable beyond {RK4_STABILITY / XUE2021['kb']:.0f} s); use a smaller --dt-s")
    cbf, aff = load_volume(args.cbf, value_range=(0.0, CBF_MAX))
    ref = (args.cbf, cbf, aff)
    wm = 0.0
    if args.wm is not None:
        wm, wm_aff = load_volume(args.wm, value_range=(0.0, 1.0))
        check_same_grid(ref, (args.wm, wm, wm_aff))
    if args.mask is not None:
        mask, m_aff = load_volume(args.mask)
        check_same_grid(ref, (args.mask, mask, m_aff))
        mask = mask > 0.5
        if not mask.any():
            raise InputError("empty brain: the mask has no voxels", file=args.mask)
    else:
        mask = np.ones(cbf.shape, dtype=bool)
    if not np.any(cbf[mask] > 0):
        raise InputError("empty brain: CBF is zero everywhere", file=args.cbf)
    cbf_after = None
    if args.cbf_after is not None:
        try:
            cbf_after = float(args.cbf_after)
        except ValueError:
            cbf_after, a_aff = load_volume(args.cbf_after, value_range=(0.0, CBF_MAX))
            check_same_grid(ref, (args.cbf_after, cbf_after, a_aff))
        else:
            if not (0 <= cbf_after <= CBF_MAX):
                raise InputError(f"--cbf-after must lie in [0, {CBF_MAX}] ml/100 ml/min, got {cbf_after}")
    _positive("followup-h", args.followup_h)
    if args.reperfusion_h is not None:
        _positive("reperfusion-h", args.reperfusion_h, allow_zero=True)
    _check_budget(args.followup_h * 3600.0 / args.dt_s * int(mask.sum()), args.max_steps, "voxel-steps")
    res = simulate_tissue_death(cbf, hours=args.followup_h, reperfusion_h=args.reperfusion_h, cbf_after=cbf_after,
                                wm_fraction=wm, dt_s=args.dt_s, threads=args.threads)
    dead = np.where(mask, res["dead"], 0.0)
    save_volume(args.out, dead.astype(np.float32), aff)
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def register(subparsers) -> None:
    sim = subparsers.add_parser(
        "simulate", help="run a mechanistic forward model (glioma, alzheimer, stroke)",
        description="Run one mechanistic forward model from files. Units: mm, glioma days, "
        "Alzheimer's years, stroke hours, CBF ml/100 ml/min.",
    )
    sub = sim.add_subparsers(dest="model_name", required=True, metavar="MODEL")

    g = sub.add_parser(
        "glioma", help="Fisher-Kolmogorov tumour growth on WM/GM maps",
        description="du/dt = div(D grad u) + rho u (1 - u), D = dw WM + dw dg_ratio GM (mm^2/day). "
        "Writes the tumour cell density u in [0, 1] after --days on the input grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("--wm", required=True, type=Path, help="white-matter probability map (NIfTI, values in [0, 1])")
    g.add_argument("--gm", required=True, type=Path, help="grey-matter probability map (NIfTI, same grid as --wm)")
    g.add_argument("--seed-mm", required=True, type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="seed centre in world coordinates (mm, through the NIfTI affine); must lie in tissue "
                   f"(WM + GM >= {SEED_TISSUE_MIN})")
    g.add_argument("--dw", type=float, default=0.2, help="white-matter diffusivity (mm^2/day)")
    g.add_argument("--dg-ratio", type=float, default=0.1, help="grey/white diffusivity ratio (unitless)")
    g.add_argument("--rho", type=float, default=0.03, help="proliferation rate (1/day)")
    g.add_argument("--days", type=float, default=365.0, help="simulated time (days)")
    g.add_argument("--seed-sigma-mm", type=float, default=2.0, help="Gaussian seed width (mm)")
    g.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    g.add_argument("--out", required=True, type=Path, help="output NIfTI of u (unitless, [0, 1])")
    g.add_argument("--max-steps", type=float, default=GRID_STEP_BUDGET,
                   help="refuse runs needing more voxel-steps (stable steps x tissue box voxels)")
    g.set_defaults(func=_run_glioma)

    a = sub.add_parser(
        "alzheimer", help="network Fisher-KPP / diffusion of tau on a connectome",
        description="du/dt = -kappa L u + alpha u (1 - u) on the max-normalised connectome Laplacian "
        "(--model diffusion drops the growth term). Time in years; writes a TSV with a 'time' column "
        "(years) and one column per region, one row per output time from t = 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--connectome", required=True, type=Path,
                   help="square symmetric non-negative matrix, CSV or TSV, header = region names")
    a.add_argument("--seed-regions", required=True, help="comma-separated region names seeded at t = 0")
    a.add_argument("--seed-value", type=float, default=0.1, help="initial concentration in seed regions (unitless, (0, 1])")
    a.add_argument("--kappa", type=float, required=True, help="transport rate (1/year)")
    a.add_argument("--alpha", type=float, default=0.0, help="production (growth) rate (1/year)")
    a.add_argument("--model", choices=["fkpp", "diffusion"], default="fkpp", help="network model")
    a.add_argument("--years", type=float, default=20.0, help="simulated time (years)")
    a.add_argument("--dt-years", type=float, default=1.0, help="output spacing (years)")
    a.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    a.add_argument("--out", required=True, type=Path, help="output TSV")
    a.add_argument("--max-steps", type=float, default=NETWORK_STEP_BUDGET,
                   help="refuse runs needing more solver steps or output rows")
    a.set_defaults(func=_run_alzheimer)

    s = sub.add_parser(
        "stroke", help="tissue death from a CBF map (Xue et al. 2021)",
        description="Per-voxel hypoxia -> toxic state -> dead fraction model. CBF in ml/100 ml/min, "
        "times in hours since onset. Writes the dead fraction D in [0, 1] at --followup-h (core = D > 0.8).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--cbf", required=True, type=Path, help=f"acute CBF map (NIfTI, ml/100 ml/min, in [0, {CBF_MAX:g}])")
    s.add_argument("--wm", type=Path, default=None,
                   help="white-matter probability map (NIfTI, [0, 1]); WM perfusion x2.6998 before hypoxia")
    s.add_argument("--mask", type=Path, default=None, help="brain mask (NIfTI); D = 0 outside")
    s.add_argument("--reperfusion-h", type=float, default=None,
                   help="time of reperfusion (hours since onset); omit for none")
    s.add_argument("--cbf-after", default=None,
                   help="CBF after reperfusion: a number or a NIfTI map (ml/100 ml/min); "
                   "default the normal value 56 GM / 21 WM")
    s.add_argument("--followup-h", type=float, required=True, help="simulated time (hours since onset)")
    s.add_argument("--dt-s", type=float, default=60.0, help="integration step (seconds)")
    s.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    s.add_argument("--out", required=True, type=Path, help="output NIfTI of the dead fraction D")
    s.add_argument("--max-steps", type=float, default=GRID_STEP_BUDGET,
                   help="refuse runs needing more voxel-steps (RK4 steps x voxels)")
    s.set_defaults(func=_run_stroke)
