"""Benchmark of the Alzheimer's solver-in-the-loop families (``neurohybrid bench sol``).

Virtual patients from the project's own generator (``neurohybrid.synth.alzheimer``: tau seeded in
both entorhinal cortices 10-20 years before the first visit, spread on tvb-data's DK-68
connectome, SUVR = 1 + A tau + regional noise 0.05, visits at ~0, 1.5, 3, 4.5 years; the
generator's hidden regional clearance is left out, the benchmark is about the solver).
``sol`` and ``sol_precomputed`` are trained through the families themselves (fine trajectories of
prior draws from every visit of the training subjects, training, validation on held-out draws,
fall-back) on a few training subjects. On held-out subjects each solver integrates from the last
observed visit over the subject's own horizon to the held-out visit, (a) at the subject's
generator parameters and (b) at a held-out draw from the SOL prior box, and is compared with the
fine solver: RMSE over regions (SUVR) at the held-out visit, best-of-2 wall times, one thread.

Set-ups: fine = RK4 of the model with h * Jacobian bound <= 0.05 (``fine_rollout``, torch, the
same implementation as the coarse ones; the Numba RK4 at that step is timed too, ``fine_numba_s``);
coarse = one semi-implicit step per ``sol_coarse_dt`` (``_imex_step``); coarse + SOL-n and
coarse + pre-computed = the same step corrected by each family's network. For the speed-up at
equal accuracy the corrected set-ups also run at half the step, and as an honest classical
reference, the plain coarse step and a Strang splitting with exact transport (both at H / m,
m = 1, 2, 4, 8, 16) give the cheapest non-learned set-up within the tolerance.
"""

from __future__ import annotations

import time

import numpy as np

TOLERANCE_SUVR = 0.01  # RMSE over regions, SUVR: a fifth of the generator's regional measurement noise (0.05)
ERROR_METRIC = ("RMSE over regions (SUVR) at the held-out visit against the fine solver (RK4, h * Jacobian bound "
                "<= 0.05), from the last observed visit")


def _subject(i: int, seed: int, weights, names, vols):
    """(inputs, target) SubjectData of virtual patient i and its generator parameters."""
    from neurohybrid.disorders.alzheimer.inputs import region_centroids
    from neurohybrid.disorders.base import SubjectData
    from neurohybrid.solvers.network import laplacian, simulate_network
    from neurohybrid.synth import alzheimer as synth

    rng = np.random.default_rng([int(seed), 4099, i])
    p = synth.draw_parameters(rng)
    u0 = np.zeros(len(names))
    for side in ("L", "R"):
        u0[names.index(f"{side}_entorhinal")] = p["seed_level"]
    t_eval = p["pre_years"] + np.asarray(p["visit_years"])
    tau = simulate_network(laplacian(weights), u0, t_eval, kappa=p["kappa"], alpha=p["alpha"], model="fkpp",
                           threads=1)[0]
    suvr = 1.0 + p["suvr_amplitude"] * tau + rng.normal(0.0, synth.REGION_NOISE_SUVR, tau.shape)
    years = np.asarray(p["visit_years"], float)
    name = f"solbench{i:02d}"
    inputs = SubjectData(name, "alzheimer", {"suvr": suvr[:-1], "years": years[:-1], "connectome": weights,
                                             "volumes": vols, "centroids": region_centroids(list(names))},
                         {"regions": list(names), "target_years": float(years[-1])})
    target = SubjectData(name, "alzheimer", {"suvr": suvr[-1]}, {"regions": list(names), "years": float(years[-1])})
    return inputs, target, np.array([p["kappa"], p["alpha"], p["suvr_amplitude"]])


def strang_rollout(theta_rows, batch, settings, coarse_dt):
    """Classical reference: Strang splitting with exact sub-flows (half a logistic step, exact
    transport exp(-h kappa L), half a logistic step), n = ceil(gap / coarse_dt) steps per interval."""
    import math

    import torch

    from neurohybrid.disorders.alzheimer.families import _spectral_apply, _spectral_of, logistic_flow

    spectral = _spectral_of(batch)
    theta = theta_rows[batch.owner]
    kappa, alpha, amp = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    cov = torch.cat([torch.zeros(*batch.base.shape, 7, dtype=batch.base.dtype), spectral], dim=-1)
    e = batch.first - batch.base
    states, prev = [], batch.times[:, 0]
    for k in range(batch.times.shape[1]):
        gap = (batch.times[:, k] - prev)[:, None]
        if float(gap.max()) > 0:
            n = max(1, math.ceil(float(gap.max()) / coarse_dt - 1e-9))
            h = gap / n
            s = kappa * h
            for _ in range(n):
                e = logistic_flow(e, alpha, amp, h / 2)
                e = _spectral_apply(cov, e, lambda lam, s=s: torch.exp(-s * lam))
                e = logistic_flow(e, alpha, amp, h / 2)
        states.append(batch.base + e)
        prev = batch.times[:, k]
    return torch.stack(states, dim=1)


def _numba_fine_seconds(subj, theta, settings, dt, horizon):
    """Best-of-2 wall time of the Numba RK4 at the fine step (start raised to the baseline: the
    Numba local model has no relu on the growth; timing only)."""
    from neurohybrid.hybrid.solver_in_loop import time_call
    from neurohybrid.solvers.network import simulate_network

    base = subj.baseline(settings)
    start = np.maximum(subj.suvr[-1], base)
    k, a, amp = (float(x) for x in theta)
    return time_call(lambda: simulate_network(subj.lap, start, [horizon], kappa=k, alpha=a / amp, model="local",
                                              baseline=base, capacity=base + amp, method="rk4", dt=dt, threads=1), 2)


def _measure(models, theta, batch, s) -> dict:
    """Errors against the fine solver and best-of-2 wall times of every set-up at theta (1, 3)."""
    import torch

    from neurohybrid.disorders.alzheimer.families import fine_dt, fine_rollout, sol_rollout
    from neurohybrid.hybrid.solver_in_loop import time_call

    H = s.sol_coarse_dt
    runs = {"coarse": lambda: sol_rollout(models["sol"], theta, batch, s, H, corrected=False)}
    for key in ("sol", "sol_precomputed"):
        for m in (1, 2):
            runs[f"{key}@{m}"] = lambda h=H / m, mod=models[key]: sol_rollout(mod, theta, batch, s, h)
    for m in (1, 2, 4, 8, 16):
        runs[f"coarse@{m}"] = lambda h=H / m: sol_rollout(models["sol"], theta, batch, s, h, corrected=False)
        runs[f"strang@{m}"] = lambda h=H / m: strang_rollout(theta, batch, s, h)
    with torch.no_grad():
        dt = fine_dt(theta, batch)
        fine = fine_rollout(theta, batch, s, dt)[0, -1]
        errors = {k: float(torch.sqrt(((r()[0, -1] - fine) ** 2).mean())) for k, r in runs.items()}
    times = {k: time_call(r, 2) for k, r in runs.items()}
    return {"fine_s": time_call(lambda: fine_rollout(theta, batch, s, dt), 2), "coarse_s": times["coarse"],
            "sol_s": times["sol@1"], "sol_precomputed_s": times["sol_precomputed@1"],
            "coarse_error": errors["coarse"], "sol_error": errors["sol@1"],
            "sol_precomputed_error": errors["sol_precomputed@1"], "fine_dt_years": dt,
            "strang_error": errors["strang@1"], "strang_s": times["strang@1"], "errors": errors, "seconds": times}


def run(quick: bool = False, seed: int = 0, n_train: int | None = None, n_test: int | None = None,
        config: dict | None = None) -> dict:
    """Train sol and sol_precomputed on ``n_train`` virtual patients (default settings; quick:
    the sloppy ones, fewer subjects and draws), then measure fine / coarse / coarse + SOL-n /
    coarse + pre-computed on ``n_test`` held-out ones. Returns the ``neurohybrid bench sol`` record."""
    import torch

    from neurohybrid.anatomy.connectomes import normative_connectome
    from neurohybrid.disorders.alzheimer.families import SolverInTheLoop, SolverPrecomputed
    from neurohybrid.disorders.alzheimer.model import Subject, make_batch

    torch.set_num_threads(1)  # the Numba solves pass threads=1: one thread on both sides
    n_train = n_train or (2 if quick else 4)
    n_test = n_test or (1 if quick else 6)
    cfg = dict(config or {"seed": seed, "sloppy": bool(quick)})
    if quick and config is None:
        cfg["alzheimer"] = {"sol_samples": 2, "epochs": 8, "patience": None}
    weights, names = normative_connectome()
    vols = np.random.default_rng(seed).uniform(2000.0, 9000.0, len(names))
    subjects = [_subject(i, seed, weights, names, vols) for i in range(n_train + n_test)]
    train_pairs = [(inp, tgt) for inp, tgt, _ in subjects[:n_train]]
    cpu = torch.device("cpu")
    fams, models, train_seconds, fallback = {}, {}, {}, {}
    for key, cls in (("sol", SolverInTheLoop), ("sol_precomputed", SolverPrecomputed)):
        fam = cls(cfg, cpu)
        start = time.perf_counter()
        ck = fam.train(train_pairs)
        train_seconds[key] = time.perf_counter() - start
        fams[key], models[key] = fam, fam.model(ck)
        fallback[key] = {"use_correction": bool(ck["use_correction"]), "validation": ck["validation"],
                         "n_trajectories": ck["n_trajectories"], "epochs": len(ck["history"])}
    s = fams["sol"].s
    dtype = s.torch_dtype
    draw_rng = np.random.default_rng([int(seed), 31337])
    cases = []
    for inp, _, truth in subjects[n_train:]:
        subj = Subject.from_inputs(inp)
        batch = make_batch([subj], s, cpu, forecast_times=[subj.target_years])
        horizon = float(subj.target_years - subj.years[-1])
        draw = s.sol_bounds().sample(1, draw_rng)[0]
        draw[2] = max(draw[2], 1.05 * float(np.max(subj.suvr[-1] - subj.baseline(s))))
        for label, th in (("generator", truth), ("prior_draw", draw)):
            case = _measure(models, torch.as_tensor(th[None], dtype=dtype), batch, s)
            cases.append({"case": f"{inp.subject}:{label}", **case,
                          "fine_numba_s": _numba_fine_seconds(subj, th, s, case["fine_dt_years"], horizon),
                          "horizon_years": horizon, "kappa": float(th[0]), "alpha": float(th[1]),
                          "suvr_amplitude": float(th[2])})
    summary = _summary(cases)
    return {"disorder": "alzheimer", "error_metric": ERROR_METRIC, "tolerance": TOLERANCE_SUVR,
            "coarse_setup": (f"one semi-implicit step per {s.sol_coarse_dt} years (exact logistic growth, then "
                             "backward-Euler transport through the spectral Laplacian), against RK4 with h * Jacobian "
                             "bound <= 0.05 (~100-400 steps per visit interval); forward Euler's limit is "
                             "h < 2 / (kappa rho(L) + alpha), ~0.4-1.5 years in the prior box"),
            "train_seconds": train_seconds, "training": fallback, "n_train": n_train, "n_test": n_test,
            "settings": {k: getattr(s, k) for k in ("sol_coarse_dt", "sol_steps", "sol_samples", "sol_trajectory_steps",
                                                    "sol_batch_size", "sol_weight_power", "epochs", "hidden", "sol_kappa_range",
                                                    "sol_alpha_range")},
            "cases": cases, "summary": summary}


def _summary(cases: list[dict]) -> dict:
    def med(key, source=None):
        vals = [c[key] if source is None else c[source][key] for c in cases]
        return float(np.median(vals))

    out = {k: med(k) for k in ("fine_s", "coarse_s", "sol_s", "sol_precomputed_s", "coarse_error", "sol_error",
                               "sol_precomputed_error", "fine_numba_s", "strang_error", "strang_s")}
    out["speedup_vs_fine"] = out["fine_s"] / max(out["sol_s"], 1e-12)
    out["speedup_vs_fine_numba"] = out["fine_numba_s"] / max(out["sol_s"], 1e-12)
    out["cases_sol_better_than_coarse"] = int(sum(c["sol_error"] < c["coarse_error"] for c in cases))
    out["cases_precomputed_better_than_coarse"] = int(sum(c["sol_precomputed_error"] < c["coarse_error"] for c in cases))
    out["n_cases"] = len(cases)

    def cheapest(keys):
        ok = [(med(k, "seconds"), k) for k in keys if med(k, "errors") <= TOLERANCE_SUVR]
        return min(ok) if ok else None

    corrected = cheapest([f"{f}@{m}" for f in ("sol", "sol_precomputed") for m in (1, 2)])
    out["equal_accuracy_setup"] = corrected[1] if corrected else None
    out["speedup_equal_accuracy"] = out["fine_s"] / corrected[0] if corrected else None
    classical = cheapest([f"{f}@{m}" for f in ("coarse", "strang") for m in (1, 2, 4, 8, 16)])
    out["classical_equal_accuracy_setup"] = classical[1] if classical else None
    out["speedup_equal_accuracy_classical"] = out["fine_s"] / classical[0] if classical else None
    out["median_error_by_setup"] = {k: med(k, "errors") for k in cases[0]["errors"]}
    out["median_seconds_by_setup"] = {k: med(k, "seconds") for k in cases[0]["seconds"]}
    return out


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1, default=str))
