"""A tiny synthetic Alzheimer's cohort on disk (BIDS sessions + preprocessing TSVs) for tests.

Ground truth: the local network FKPP in SUVR units (the model's own form, neurohybrid.solvers.network
"local" with alpha' = alpha / A, capacity b + A) on a small random connectome over real
Desikan-Killiany region names (so the model finds their atlas positions), optionally with an
extra regional clearance the mechanistic model lacks (missing physics): -gamma_i (u - b) with
gamma_i = clearance * c_i, c_i = clip((y_i + 60 mm) / 100 mm, 0, 1) from the region's MNI
centroid (frontal regions clear, occipital ones do not), as in the demo generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.solvers.network import laplacian, simulate_network

YEARS = [0.0, 1.5, 3.0, 4.5]


def dk_names(n: int) -> list[str]:
    """n cortical Desikan-Killiany names spread over both hemispheres and the brain's length."""
    from neurohybrid.anatomy.atlas import region_table

    t = region_table()
    names = sorted(t.loc[t["structure"] == "cortex", "name"])
    return [names[i] for i in np.linspace(0, len(names) - 1, n).astype(int)]


def position_weights(names) -> np.ndarray:
    """c_i = clip((y_i + 60) / 100, 0, 1) from the regions' atlas centroids."""
    from neurohybrid.disorders.alzheimer.inputs import region_centroids

    return np.clip((region_centroids(list(names))[:, 1] + 60.0) / 100.0, 0.0, 1.0)


def make_connectome(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.random((n, n)) * (rng.random((n, n)) < 0.4)
    w = np.triu(w, 1)
    w = w + w.T
    for i in range(n):  # a ring keeps it connected
        w[i, (i + 1) % n] = w[(i + 1) % n, i] = max(w[i, (i + 1) % n], 0.5)
    return w, dk_names(n)


def simulate_subject(w, kappa, alpha, seed_amp, years=YEARS, clearance=0.0, noise=0.0, rng=None, baseline=1.0,
                     amplitude=2.0, names=None, seeds=(0, 1)):
    """SUVR (visits, N): du/dt = -kappa L (u - b) + alpha e (1 - e / A) [- gamma_i e], e = u - b,
    from u0 = b + seed_amp in the seed regions at years[0]."""
    n = w.shape[0]
    u0 = np.full(n, baseline)
    u0[list(seeds)] += seed_amp
    lap = laplacian(w)
    if clearance == 0.0:
        traj = simulate_network(lap, u0, np.asarray(years), kappa=kappa, alpha=alpha / amplitude, model="local",
                                baseline=np.full(n, baseline), capacity=np.full(n, baseline + amplitude), threads=1)[0]
    else:
        from scipy.integrate import solve_ivp

        gamma = clearance * position_weights(names)

        def f(_t, u):
            e = u - baseline
            return -kappa * lap @ e + alpha * e * (1.0 - e / amplitude) - gamma * e

        traj = solve_ivp(f, (years[0], years[-1]), u0, t_eval=years, rtol=1e-9, atol=1e-11).y.T
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
        kappa, alpha = rng.uniform(0.05, 0.3), rng.uniform(0.2, 0.8)
        traj = simulate_subject(w, kappa, alpha, rng.uniform(0.5, 1.2), clearance=clearance, noise=noise, rng=rng,
                                names=names)
        write_subject(bids, preproc, sub, w, names, traj)
        truth[sub] = (kappa, alpha)
    return bids, preproc, truth


def subject_data(sub: str, w, names, traj, years=YEARS, volumes=None):
    """(inputs, target) SubjectData in memory, as ``neurohybrid inputs`` would build them."""
    from neurohybrid.disorders.alzheimer.inputs import region_centroids
    from neurohybrid.disorders.base import SubjectData

    vols = np.full(len(names), 5000.0) if volumes is None else volumes
    years = np.asarray(years, float)
    inputs = SubjectData(sub, "alzheimer", {"suvr": traj[:-1], "years": years[:-1] - years[0], "connectome": w,
                                            "volumes": vols, "centroids": region_centroids(list(names))},
                         {"regions": list(names), "target_years": float(years[-1] - years[0])})
    target = SubjectData(sub, "alzheimer", {"suvr": traj[-1]}, {"regions": list(names), "years": float(years[-1] - years[0])})
    return inputs, target


def hidden_cohort(n_subjects: int, clearance: float, n_regions=12, noise=0.005, seed=0):
    """In-memory cohort {subject: (inputs, target)}: the model's own dynamics, plus (clearance > 0)
    a position-dependent regional clearance the mechanistic model lacks."""
    w, names = make_connectome(n_regions, seed)
    rng = np.random.default_rng(seed + 1)
    vols = rng.uniform(2000, 9000, n_regions)
    out = {}
    for i in range(n_subjects):
        traj = simulate_subject(w, rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.8), rng.uniform(0.4, 1.0),
                                clearance=clearance, noise=noise, rng=rng, names=names,
                                seeds=tuple(rng.choice(n_regions, 2, replace=False)))
        out[f"H{i + 1:02d}"] = subject_data(f"H{i + 1:02d}", w, names, traj, volumes=vols)
    return out
