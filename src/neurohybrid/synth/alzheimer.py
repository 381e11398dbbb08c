"""Alzheimer's virtual patients: tau spread on the normative DK-68 connectome, seen by tau PET.

Plain model (``neurohybrid.solvers.network``, model "fkpp"): du/dt = -kappa L u + alpha u (1 - u)
on the max-normalised Laplacian of tvb-data's DK-68 connectome, u0 = s0 ~ U(0.02, 0.1) in both
entorhinal cortices T_pre ~ U(10, 20) years before the first visit; kappa ~ logU(0.1, 1) /yr,
alpha ~ U(0.2, 0.45) /yr. (Chaggar et al. report transport 0.02-0.06 /yr on their connectome; on
tvb-data's sparser DK-68 that leaves tau in the entorhinal cortex for decades, so the range is
raised until spread over the 4.5-year window is visible.)

HIDDEN MECHANISM: regional clearance. du/dt = -kappa L u + alpha u (1 - u) - gamma_i u with
gamma_i = g * c_i, c_i = clip((y_i + 60 mm) / 100 mm, 0, 1), y_i the anterior-posterior MNI
coordinate of region i's centroid: frontal regions clear tau (up to g ~ U(0.05, 0.15) /yr),
occipital ones do not. Region position is the same in every subject, so the term is learnable
across subjects. It is integrated exactly by the same solver: -kappa L u - gamma u =
-kappa (L + diag(gamma) / kappa) u.

Observation: regional SUVR = 1 + A u_i (A ~ U(1.2, 2)) + N(0, 0.05) per region and visit, painted
into the subject's DK cortical parcels (GM-weighted; WM 0.9, CSF 0.3, subcortical 1.15 for
off-target binding, cerebellar and other GM 1.0), blurred by the scanner's PSF (Gaussian, FWHM drawn
per patient in PET_PSF_FWHM_MM), rescaled so the
inferior cerebellar GM reference averages exactly 1, plus voxel noise (sigma 0.03).
Visits at years 0, ~1.5, ~3, ~4.5 (jitter +-0.25).

Neurodegeneration: a T1w at every visit, with regional atrophy that follows tau with a lag. Region i
has lost the fraction a_i(t) = beta u_i(t - lag) of its grey matter at time t (beta ~ U(ATROPHY_RANGE),
lag ~ U(ATROPHY_LAG_YEARS) per patient), replaced by CSF (widened sulci): the GM probability of its
cortical voxels is scaled by 1 - a_i, the CSF probability takes the rest, and the T1w intensity
changes by the lost GM times (CSF - GM intensity), the tissue intensities fitted to the subject's
own T1w. The PET of the visit is painted on the atrophied tissue, so partial-volume effects grow
with atrophy. The ranges are ours: tau-positive regions losing 10-25 % of their grey matter over
years is the order of the cortical thinning reported in Alzheimer's disease, not a fit to data.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from scipy import ndimage

from neurohybrid.anatomy.connectomes import normative_connectome
from neurohybrid.io import write_tsv
from neurohybrid.solvers.network import laplacian, simulate_network
from neurohybrid.synth import bids
from neurohybrid.synth.anatomy import SubjectAnatomy, observe_image, template_set, wm_reference

# reconstructed resolution of the PET (Gaussian PSF FWHM, uniform per patient): from current PET/CT
# scanners' 4-5 mm to the 8 mm that ADNI smooths its multi-scanner images to (Joshi et al. 2009,
# NeuroImage 46:154)
PET_PSF_FWHM_MM = (4.0, 8.0)
REGION_NOISE_SUVR = 0.05
VOXEL_NOISE_SUVR = 0.03
ATROPHY_RANGE = (0.10, 0.25)      # GM fraction lost by a region whose tau reached u = 1 a lag earlier
ATROPHY_LAG_YEARS = (1.0, 3.0)    # neurodegeneration follows tau by this lag


@functools.lru_cache(maxsize=4)
def network_setup(voxel_mm: float):
    """(Laplacian, cortical names, clearance weights c_i) shared by every AD subject."""
    weights, names = normative_connectome()
    tpl = template_set(voxel_mm)
    regions = tpl["regions"].set_index("name")
    labels = np.asarray(tpl["atlas"].dataobj)
    affine = tpl["atlas"].affine
    c = np.empty(len(names))
    for i, name in enumerate(names):
        ijk = np.argwhere(labels == regions.loc[name, "id"])
        y = (ijk @ affine[:3, :3].T + affine[:3, 3])[:, 1].mean() if len(ijk) else 0.0
        c[i] = np.clip((y + 60.0) / 100.0, 0.0, 1.0)
    return laplacian(weights), list(names), c


def draw_parameters(rng) -> dict:
    base = [0.0, 1.5, 3.0, 4.5]
    years = [0.0] + [float(np.round(b + rng.uniform(-0.25, 0.25), 2)) for b in base[1:]]
    return {
        "kappa": float(np.exp(rng.uniform(np.log(0.1), np.log(1.0)))),
        "alpha": float(rng.uniform(0.2, 0.45)),
        "seed_level": float(rng.uniform(0.02, 0.1)),
        "pre_years": float(rng.uniform(10.0, 20.0)),
        "suvr_amplitude": float(rng.uniform(1.2, 2.0)),
        "hidden_clearance": float(rng.uniform(0.05, 0.15)),
        "visit_years": years,
        "atrophy_beta": float(rng.uniform(*ATROPHY_RANGE)),
        "atrophy_lag_years": float(rng.uniform(*ATROPHY_LAG_YEARS)),
        "pet_psf_fwhm_mm": float(rng.uniform(*PET_PSF_FWHM_MM)),
    }


def simulate_tau(params: dict, voxel_mm: float, *, hidden: bool = True, lag_years: float = 0.0
                 ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Regional tau (visits, 68) from the seed to every visit (``lag_years`` earlier than each
    visit); returns (u, names, gamma)."""
    lap, names, c = network_setup(voxel_mm)
    gamma = params["hidden_clearance"] * c if hidden else np.zeros(len(names))
    u0 = np.zeros(len(names))
    for side in ("L", "R"):
        u0[names.index(f"{side}_entorhinal")] = params["seed_level"]
    t_eval = params["pre_years"] + np.asarray(params["visit_years"]) - float(lag_years)
    op = lap + np.diag(gamma / params["kappa"])
    u = simulate_network(op, u0, t_eval, kappa=params["kappa"], alpha=params["alpha"], model="fkpp", threads=1)[0]
    return u, names, gamma


def cortical_label_field(anat: SubjectAnatomy) -> np.ndarray:
    """DK labels carried into nearby unlabelled GM (<= 4 mm), so painting does not leave gaps."""
    labels = anat.atlas
    dist, (ii, jj, kk) = ndimage.distance_transform_edt(labels == 0, sampling=(anat.voxel_mm,) * 3,
                                                       return_indices=True)
    near = labels[ii, jj, kk]
    grow = (labels == 0) & (dist <= 4.0) & (anat.gm > 0.3) & ~anat.cerebellum
    return np.where(grow, near, labels)


def tissue_intensities(anat: SubjectAnatomy) -> dict[str, float]:
    """T1w intensity of pure GM, WM and CSF: least squares of the brain's T1w on its tissue maps."""
    sel = anat.brain
    design = np.column_stack([anat.gm[sel], anat.wm[sel], anat.csf[sel]])
    coef = np.linalg.lstsq(design, anat.t1[sel], rcond=None)[0]
    return dict(zip(("gm", "wm", "csf"), (float(c) for c in coef)))


def atrophied(anat: SubjectAnatomy, loss_by_name: dict, intensities: dict) -> SubjectAnatomy:
    """The anatomy with region i's cortical GM scaled by 1 - loss_i, the lost GM turned into CSF."""
    import dataclasses

    regions = anat.regions
    lut = np.zeros(int(regions["id"].max()) + 1)
    for rid, name in zip(regions["id"], regions["name"]):
        lut[rid] = loss_by_name.get(name, 0.0)
    lost = anat.gm * lut[cortical_label_field(anat)] * anat.brain
    t1 = anat.t1 + lost * (intensities["csf"] - intensities["gm"])
    return dataclasses.replace(anat, gm=anat.gm - lost, csf=anat.csf + lost, t1=t1)


def pet_image(anat: SubjectAnatomy, suvr_by_name: dict, rng, psf_fwhm_mm: float) -> np.ndarray:
    regions = anat.regions
    lut = np.ones(int(regions["id"].max()) + 1)
    for rid, name, structure in zip(regions["id"], regions["name"], regions["structure"]):
        if name in suvr_by_name:
            lut[rid] = suvr_by_name[name]
        elif structure != "cortex" and name != "brainstem":
            lut[rid] = 1.15
    lut[0] = 1.0
    gm_value = lut[cortical_label_field(anat)]
    clean = np.where(anat.brain, anat.gm * gm_value + 0.9 * anat.wm + 0.3 * anat.csf, 0.05)
    sigma_vox = psf_fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / anat.voxel_mm
    blurred = ndimage.gaussian_filter(clean, sigma_vox, mode="constant")
    blurred /= blurred[anat.cerebellum].mean()
    return (blurred + rng.normal(0.0, VOXEL_NOISE_SUVR, blurred.shape)).astype(np.float32)


def write_subject(subject: str, anat: SubjectAnatomy, rng, bids_root, truth_dir, *, dwi: bool = False
                  ) -> tuple[dict, SubjectAnatomy]:
    """Write one patient's visits; returns its parameters and the anatomy of the first visit (the
    truth the preprocessing of that visit's T1w is scored against)."""
    params = draw_parameters(rng)
    u, names, gamma = simulate_tau(params, anat.voxel_mm)
    truth_sub = truth_dir / f"sub-{subject}"
    sessions = []
    rows = []
    loss = params["atrophy_beta"] * simulate_tau(params, anat.voxel_mm, lag_years=params["atrophy_lag_years"])[0]
    intensities = tissue_intensities(anat)
    ref = wm_reference(anat)
    voxel_ml = anat.voxel_mm**3 / 1000.0
    labels = cortical_label_field(anat)
    ids = anat.regions.set_index("name")["id"]
    first = None
    for k, year in enumerate(params["visit_years"]):
        ses = f"{k + 1:02d}"
        sessions.append((ses, year))
        visit = atrophied(anat, dict(zip(names, loss[k])), intensities)
        if first is None:
            first = visit
        true_suvr = 1.0 + params["suvr_amplitude"] * u[k]
        observed = true_suvr + rng.normal(0.0, REGION_NOISE_SUVR, true_suvr.shape)
        img = pet_image(visit, dict(zip(names, observed)), rng, params["pet_psf_fwhm_mm"])
        path = bids.session_path(bids_root, subject, ses, "pet", "pet", entities="trc-AV1451")
        bids.write_image(path, img, anat.affine)
        bids.write_json_sidecar(path, bids.pet_sidecar())
        # the structural T1w of the visit, on the atrophied anatomy
        t1, _ = observe_image(visit.t1, visit, rng, reference_intensity=ref)
        t1_path = bids.session_path(bids_root, subject, ses, "anat", "T1w")
        bids.write_mr_image(t1_path, t1, anat.affine)
        bids.write_json_sidecar(t1_path, bids.anat_sidecar("T1w"))
        gm_ml = [float(visit.gm[labels == ids[name]].sum()) * voxel_ml for name in names]
        rows.append(pd.DataFrame({"session": f"ses-{ses}", "years": year, "region": names, "tau": u[k],
                                  "suvr_true": true_suvr, "suvr_observed": observed, "gamma": gamma,
                                  "gm_loss_fraction": loss[k], "gm_ml": gm_ml}))
    if dwi:
        from neurohybrid.synth.dwi import write_dwi

        params["dwi"] = write_dwi(subject, "01", first, rng, bids_root, truth_dir)
    write_tsv(truth_sub / f"sub-{subject}_desc-tau_regional.tsv", pd.concat(rows, ignore_index=True),
              float_format="%.6g")
    bids.write_sessions(bids_root, subject, "alzheimer", sessions)
    params["regions"] = names
    return params, first
