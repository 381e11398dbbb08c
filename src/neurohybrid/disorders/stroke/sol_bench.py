"""Benchmark of the stroke solver in the loop (``neurohybrid bench sol``): error against the fine
solver and wall time of fine, coarse, coarse + SOL-n and coarse + pre-computed, on held-out virtual
patients and parameter draws.

Cases: virtual patients on a small phantom brain (the tests' builder: a spherical territory whose
inflow drops to the generator's ``inflow_scale``), with the demo generator's draws
(``synth.stroke.draw_parameters``: onset-to-reperfusion time or never, follow-up at 120 h, the
tissue sensitivity sigma log-uniform in (0.8, 1.25)). The correction trains on ``n_train`` patients
(their own sigma draws, ``sol.fine_trajectories``); the cases are other patients with their own
draws. Every solver runs on the same candidate voxels, 1 torch / Numba thread, best-of-2 wall times.

Run: ``PYTHONPATH=src python -c "from neurohybrid.disorders.stroke import sol_bench; print(sol_bench.run())"``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from neurohybrid.disorders.base import SharedWork, SubjectData

SHAPE = (18, 18, 18)
VOX_MM = 2.0
# relative L2 error of D at follow-up within which a coarse set-up counts as "equally accurate" as the
# fine solver (0.5% of the dead fraction; the final masks then agree to Dice >= 0.99 in these cases;
# the plain backward-Euler coarse solver is at ~7%, with Dice down to 0 where the infarct is small)
TOLERANCE = 5e-3


def phantom():
    """A small ellipsoidal brain (x, y, z, brain mask, WM, GM) on SHAPE: the stroke tests' anatomy too."""
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    brain = (x / 8.0) ** 2 + (y / 8.0) ** 2 + (z / 7.5) ** 2 <= 1.0
    wm = np.where(brain, 0.25 + 0.45 * (np.abs(x) < 3), 0.0).astype(np.float32)
    gm = np.where(brain, 1.0 - wm, 0.0).astype(np.float32)
    return x, y, z, brain, wm, gm


def virtual_patient(name: str, rng) -> tuple[SubjectData, dict]:
    """(inputs of a forecast, the generator's draws) of one patient: acute CBF of a spherical territory
    at the drawn inflow scale (smoothed), no acute core needed (the solvers run from onset)."""
    from neurohybrid.solvers.stroke import normal_cbf
    from neurohybrid.synth.stroke import draw_parameters

    params = draw_parameters(rng)
    x, y, z, brain, wm, gm = phantom()
    c = rng.uniform(-2.0, 2.0, 3)
    territory = brain & ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= rng.uniform(5.0, 6.5) ** 2)
    normal = np.where(brain, normal_cbf(wm), 0.0)
    cbf = np.where(brain, ndimage.gaussian_filter(np.where(territory, params["inflow_scale"], 1.0), 0.8) * normal, 0.0)
    meta = dict(sessions=["acute"], target_session="followup", hours_acute=params["onset_to_imaging_h"],
                hours_followup=params["followup_h"], reperfusion_h=params["onset_to_reperfusion_h"],
                affine=np.diag([VOX_MM] * 3 + [1.0]).tolist(), full_shape=list(SHAPE), crop_offset=[0, 0, 0],
                voxel_mm=[VOX_MM] * 3)
    arrays = dict(cbf=cbf.astype(np.float32), wm=wm, gm=gm, core=np.zeros(SHAPE, bool))
    return SubjectData(name, "stroke", arrays, meta), params


def run(quick: bool = False, seed: int = 0) -> dict:
    from neurohybrid.disorders.stroke import sol
    from neurohybrid.disorders.stroke.families import SolverInLoop, SolverPrecomputed

    torch.set_num_threads(1)
    n_train, n_test = (2, 3) if quick else (6, 8)
    cfg = {"seed": seed, "device": "cpu", "sloppy": bool(quick)}
    fams = {"sol": SolverInLoop(cfg, torch.device("cpu")), "sol_precomputed": SolverPrecomputed(cfg, torch.device("cpu"))}
    s = fams["sol"].s
    rng = np.random.default_rng(seed)
    train = [sol.Voxels.of(virtual_patient(f"train{i:02d}", rng)[0], s) for i in range(n_train)]
    test_rng = np.random.default_rng(seed + 1000)  # held-out patients and draws
    tests = [virtual_patient(f"case{i:02d}", test_rng) for i in range(n_test)]

    shared = SharedWork()
    start = time.perf_counter()
    trained = {k: f.fit_solver(train, shared) for k, f in fams.items()}
    train_seconds = time.perf_counter() - start
    models = {k: fams[k].loaded(trained[k]) for k in fams}

    cases = []
    for inputs, params in tests:
        vox = sol.Voxels.of(inputs, s)
        sigma = float(params["sensitivity"])
        if vox.cbf.size == 0:
            continue
        out = {k: fams[k].compare(models[k], vox, sigma, shared) for k in fams}
        a, b = out["sol"], out["sol_precomputed"]
        cases.append({
            "case": inputs.subject, "n_voxels": int(vox.cbf.size), "sigma": sigma, "reperfusion_h": vox.rep,
            "followup_h": vox.hours,
            "fine_s": a["fine_cost_seconds"], "coarse_s": min(a["coarse_cost_seconds"], b["coarse_cost_seconds"]),
            "sol_s": a["sol_cost_seconds"], "sol_precomputed_s": b["sol_cost_seconds"],
            "coarse_error": a["coarse_error_vs_fine"], "sol_error": a["sol_error_vs_fine"],
            "sol_precomputed_error": b["sol_error_vs_fine"],
            "coarse_dice": a["coarse_dice_vs_fine"], "sol_dice": a["sol_dice_vs_fine"],
            "sol_precomputed_dice": b["sol_dice_vs_fine"],
        })

    def med(key):
        vals = [c[key] for c in cases if c[key] is not None]
        return float(np.median(vals)) if vals else None

    keys = ("fine_s", "coarse_s", "sol_s", "sol_precomputed_s", "coarse_error", "sol_error", "sol_precomputed_error",
            "coarse_dice", "sol_dice", "sol_precomputed_dice")
    summary = {k: med(k) for k in keys}
    summary["speedup_vs_fine"] = summary["fine_s"] / summary["sol_s"] if cases and summary["sol_s"] else None
    # the cheapest corrected coarse set-up whose median error is within the tolerance
    within = [summary[f"{k}_s"] for k in ("sol", "sol_precomputed") if cases and summary[f"{k}_error"] <= TOLERANCE]
    summary["speedup_equal_accuracy"] = summary["fine_s"] / min(within) if within else None
    # for the record: the plain coarse solver at the same tolerance (no correction)
    summary["speedup_equal_accuracy_plain_coarse"] = (summary["fine_s"] / summary["coarse_s"]
                                                      if cases and summary["coarse_error"] <= TOLERANCE else None)
    summary["sol_beats_coarse_cases"] = sum(c["sol_error"] < c["coarse_error"] for c in cases)
    summary["n_cases"] = len(cases)
    return {
        "disorder": "stroke",
        "error_metric": sol.ERROR_METRIC.format(fine=s["fine_dt_s"]),
        "tolerance": TOLERANCE,
        "coarse_setup": (f"linearly implicit Xue step (T implicit in its decay, then the living fraction by "
                         f"{'backward Euler' if s['sol_coarse_scheme'] == 'euler' else 'exp(-kf T dt)'}), steps of at most "
                         f"{s['sol_step_hours']} h per constant-flow segment (fine: RK4 at {s['fine_dt_s']} s)"),
        "train_seconds": train_seconds,
        "training": {k: dict(use_correction=bool(v["use_correction"]), validation=v["validation"],
                             training_target=v["training_target"], epochs_run=len(v["history"]),
                             train_seconds=v["train_seconds"], members=v["training_data"]["members"])
                     for k, v in trained.items()},
        "cases": cases,
        "summary": summary,
    }
