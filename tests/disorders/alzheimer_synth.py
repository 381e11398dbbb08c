"""A tiny synthetic Alzheimer's cohort on disk (BIDS sessions + preprocessing TSVs) for tests.

Ground truth: the local network FKPP (neurohybrid.solvers.network) on a small random connectome,
optionally with an extra regional clearance term the mechanistic model lacks (missing physics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.solvers.network import laplacian, simulate_network

YEARS = [0.0, 1.5, 3.0, 4.5]


def make_connectome(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.random((n, n)) * (rng.random((n, n)) < 0.4)
    w = np.triu(w, 1)
    w = w + w.T
    for i in range(n):  # a ring keeps it connected
        w[i, (i + 1) % n] = w[(i + 1) % n, i] = max(w[i, (i + 1) % n], 0.5)
    names = [f"{'L' if i % 2 == 0 else 'R'}_region{i}" for i in range(n)]
    return w, names


def simulate_subject(w, kappa, alpha, seed_amp, years=YEARS, clearance=0.0, noise=0.0, rng=None, baseline=1.0,
                     capacity=3.0):
    n = w.shape[0]
    u0 = np.full(n, baseline)
    u0[:2] += seed_amp
    lap = laplacian(w)
    if clearance == 0.0:
        traj = simulate_network(lap, u0, np.asarray(years), kappa=kappa, alpha=alpha, model="local",
                                baseline=np.full(n, baseline), capacity=np.full(n, capacity), threads=1)[0]
    else:
        from scipy.integrate import solve_ivp

        def f(_t, u):
            e = u - baseline
            return -kappa * lap @ e + alpha * e * (capacity - u) - clearance * e

        traj = solve_ivp(f, (0, years[-1]), u0, t_eval=years, rtol=1e-9, atol=1e-11).y.T
    if noise:
        traj = traj + rng.normal(0, noise, traj.shape)
    return traj


def write_subject(bids: Path, preproc: Path, sub: str, w, names, traj, years=YEARS, extra_region=True):
    (bids / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"session_id": [f"ses-{i + 1:02d}" for i in range(len(years))], "years": years}).to_csv(
        bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False)
    d = preproc / f"sub-{sub}"
    (d / "dwi").mkdir(parents=True, exist_ok=True)
    (d / "anat").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(w, columns=names).to_csv(d / "dwi" / f"sub-{sub}_atlas-DK_connectivity.tsv", sep="\t", index=False)
    rng = np.random.default_rng(abs(hash(sub)) % 2**32)
    regions = names + (["brainstem"] if extra_region else [])
    pd.DataFrame({"region": regions, "volume_mm3": rng.uniform(2000, 9000, len(regions))}).to_csv(
        d / "anat" / f"sub-{sub}_atlas-DK_desc-volumes.tsv", sep="\t", index=False)
    for i, row in enumerate(traj):
        p = d / f"ses-{i + 1:02d}" / "pet"
        p.mkdir(parents=True, exist_ok=True)
        vals = list(row) + ([1.0] if extra_region else [])
        pd.DataFrame({"region": regions, "suvr": vals}).to_csv(
            p / f"sub-{sub}_ses-{i + 1:02d}_atlas-DK_desc-suvr_pet.tsv", sep="\t", index=False)


def make_cohort(root: Path, n_subjects=4, n_regions=10, noise=0.02, clearance=0.0, seed=0):
    """Write the cohort; returns (bids, preproc, truth {subject: (kappa, alpha)})."""
    bids, preproc = root / "bids", root / "preproc"
    w, names = make_connectome(n_regions, seed)
    rng = np.random.default_rng(seed + 1)
    truth = {}
    for i in range(n_subjects):
        sub = f"AD{i + 1:02d}"
        kappa, alpha = rng.uniform(0.05, 0.3), rng.uniform(0.1, 0.4)
        traj = simulate_subject(w, kappa, alpha, rng.uniform(0.5, 1.2), clearance=clearance, noise=noise, rng=rng)
        write_subject(bids, preproc, sub, w, names, traj)
        truth[sub] = (kappa, alpha)
    return bids, preproc, truth
