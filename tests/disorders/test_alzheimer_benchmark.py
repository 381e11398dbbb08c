"""Demo-sized Alzheimer's benchmark on regional data from the project's synthetic generator
(normative DK-68 connectome, hidden regional clearance, SUVR noise 0.05): every family, 2 folds.

Slow (run with `pytest -m slow tests/disorders/test_alzheimer_benchmark.py -s`): prints per-family
RMSE and timings; asserts only the time budget and finiteness, not who wins.
"""

import time

import numpy as np
import pytest
import torch

from neurohybrid.disorders.alzheimer import DISORDER
from neurohybrid.disorders.base import FAMILIES, SubjectData
from neurohybrid.hybrid.splits import assign_folds, held_out_subjects, training_subjects


def _cohort(n_subjects, seed=20261126):
    from neurohybrid.anatomy.connectomes import normative_connectome
    from neurohybrid.synth.alzheimer import REGION_NOISE_SUVR, draw_parameters, simulate_tau

    weights, names = normative_connectome()
    rng = np.random.default_rng(seed)
    vols = rng.uniform(2000, 12000, len(names))
    data, truth = {}, {}
    for i in range(n_subjects):
        sub = f"AD{i + 1:02d}"
        p = draw_parameters(rng)
        u, _, _ = simulate_tau(p, 4.0)
        suvr = 1.0 + p["suvr_amplitude"] * u + rng.normal(0, REGION_NOISE_SUVR, u.shape)
        years = np.asarray(p["visit_years"])
        inputs = SubjectData(sub, "alzheimer", {"suvr": suvr[:-1], "years": years[:-1], "connectome": weights,
                                                "volumes": vols}, {"regions": names, "target_years": float(years[-1])})
        target = SubjectData(sub, "alzheimer", {"suvr": suvr[-1]}, {"regions": names, "years": float(years[-1])})
        data[sub], truth[sub] = (inputs, target), p
    return data, truth


@pytest.mark.slow
def test_alzheimer_demo_benchmark():
    torch.set_num_threads(1)
    config = {"seed": 0}
    data, truth = _cohort(8)
    folds = assign_folds(list(data), 2, seed=0)
    rows = []
    start_all = time.perf_counter()
    cpu_all = time.process_time()
    for name in FAMILIES:
        t0, c0 = time.perf_counter(), time.process_time()
        for k in range(2):
            fam = DISORDER.family(name, config, torch.device("cpu"))
            ck = fam.train([data[s] for s in training_subjects(folds, k)]) if fam.trains_across_subjects else None
            for s in held_out_subjects(folds, k):
                fc = fam.forecast(data[s][0], ck)
                obs = data[s][1].arrays["suvr"]
                assert np.all(np.isfinite(fc.outputs["suvr"]))
                rmse = float(np.sqrt(np.mean((fc.outputs["suvr"] - obs) ** 2)))
                kerr = abs(fc.parameters["kappa"] - truth[s]["kappa"]) / truth[s]["kappa"] if "kappa" in fc.parameters else np.nan
                rows.append((name, s, rmse, kerr, fc.extra.get("sol_error"), fc.extra.get("coarse_error"),
                             fc.extra.get("speedup_equal_accuracy")))
        print(f"{name:20s} wall {time.perf_counter() - t0:6.1f} s  cpu {time.process_time() - c0:6.1f} s")
    total = time.perf_counter() - start_all
    print(f"total wall {total:.1f} s  cpu {time.process_time() - cpu_all:.1f} s")
    for name in FAMILIES:
        r = [row for row in rows if row[0] == name]
        rm = np.array([x[2] for x in r])
        ke = np.array([x[3] for x in r], dtype=float)
        extra = ""
        if r[0][4] is not None:
            extra = (f" sol_err {np.mean([x[4] for x in r]):.4f} coarse_err {np.mean([x[5] for x in r]):.4f}"
                     f" speedup@eq.acc {[x[6] for x in r]}")
        print(f"{name:20s} RMSE {rm.mean():.4f} +- {rm.std():.4f}  kappa rel.err {np.nanmean(ke) if np.isfinite(ke).any() else float('nan'):.2f}{extra}")
    assert total < 600
