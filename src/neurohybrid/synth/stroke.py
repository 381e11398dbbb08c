"""Ischaemic stroke virtual patients: Darcy perfusion with an occluded MCA-like territory and
Xue 2021 tissue death.

Territory: in the subject's own DK parcellation, the voxels of one hemisphere whose nearest DK
label is a middle-cerebral-artery region (lateral frontal, insular, lateral parietal, lateral
temporal cortex, putamen/pallidum/caudate for a proximal occlusion) -- cortex plus the white
matter under it. Occlusion variants: proximal M1 (all of it), superior or inferior M2 division.
CBF: ``neurohybrid.solvers.perfusion.darcy_perfusion`` with the territory's inflow scaled by
s_occ ~ U(0.1, 0.45) (baseline GM ~56, WM ~21 ml/100 ml/min); the normal map is the same solve
with no occlusion.

HIDDEN MECHANISM: collateral recruitment. After onset, leptomeningeal collaterals open and CBF
in the territory rises towards normal from its border inwards:
CBF(x, t) = CBF_acute(x) + c w(x) (CBF_normal(x) - CBF_acute(x)) (1 - exp(-t / tau)),
w(x) = exp(-d(x) / 10 mm), d the distance to the territory's border, tau ~ U(1, 4) h, and
strength c ~ U(0.3, 0.8) varying across subjects. The plain model, which holds the observed
acute CBF fixed until reperfusion, therefore over-predicts the final infarct. Tissue death is
``neurohybrid.solvers.stroke.simulate_tissue_death`` integrated over 15-minute segments of
piecewise-constant CBF (the solver carries D and T across segments through dead0/toxic0).

Tissue sensitivity: the tissue of each virtual patient sees CBF / sigma (the model families' sigma,
``neurohybrid.disorders.stroke.mechanistic``), sigma log-uniform in SENSITIVITY_RANGE = [0.8, 1.25]
(centred on the published Xue 2021 tissue, sigma = 1): a +-25% spread of the flow at which tissue
dies, the spread of the penumbral / core CBF thresholds reported across patients and studies
(about 10-20 ml/100 g/min; ischaemic tolerance varies with age, glucose, temperature). Drawn last
in ``draw_parameters`` (the other draws of a seed are unchanged) and written to the ground truth as
disease.sensitivity.

Observation: the acute CBF map (written at the imaging time, with the collateral gain reached
by then) plus N(0, 2) noise; acute core = D(t_imaging) > 0.8; final infarct = D(follow-up) > 0.8.
Times: onset-to-imaging U(1, 6) h; onset-to-reperfusion U(imaging + 0.5, imaging + 8) h, or n/a
(never reperfused) with probability 0.35; follow-up at 120 h.

Images (parameters drawn per patient in IMAGE_RANGES; the ranges are ours, set to the usual
appearance): the acute session has a T1w, the CBF map and a clinical trace diffusion scan (b = 0 and
3 directions at b = 1000 s/mm^2, ``synth.dwi``) whose diffusivity is lowered by the cytotoxic
oedema of the dying tissue, every compartment's by the factor 1 - adc_drop D(t_imaging): the
acute core (D > 0.8) falls below the clinical core threshold ADC < 620e-6 mm^2/s (the threshold of
the RAPID software, Purushotham et al. 2015, Int J Stroke 10:348) where healthy grey and white
matter stay above it. The follow-up session has a T1w hypointense (x 1 - t1_drop D) and a FLAIR
hyperintense (+ flair_gain D x the WM intensity) over the final infarct, D(follow-up).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neurohybrid.solvers.perfusion import darcy_perfusion
from neurohybrid.solvers.stroke import CORE_THRESHOLD, hypoxic_fraction, simulate_tissue_death
from neurohybrid.synth import bids
from neurohybrid.synth.anatomy import SubjectAnatomy, flair_image, observe_image, wm_reference

FOLLOWUP_H = 120.0
SEGMENT_H = 0.25
COLLATERAL_LENGTH_MM = 10.0
CBF_NOISE = 2.0
PERMEABILITY = 16.0  # mm^2/min: Darcy smoothing length sqrt(K / beta) = 4 mm blurs the territory border
DARCY_TOL = 1e-6     # CG relative tolerance: CBF to ~1e-4 ml/100 ml/min, far below the noise
# The published Xue 2021 tissue: CBF enters H unscaled, sigma = 1 in the model families' CBF / sigma
# (neurohybrid.disorders.stroke.mechanistic). Each subject's sigma is drawn log-uniformly in
# SENSITIVITY_RANGE around it (module docstring) and written to the ground truth as
# disease.sensitivity, the counterpart of the fitted sigma; parameter sets without one use 1.
TISSUE_SENSITIVITY = 1.0
SENSITIVITY_RANGE = (0.8, 1.25)
DEATH_DT_S = 300.0   # RK4 step (solver default 60 s): kb dt = 0.65, RK4 decay factor off by 0.1%, 5x cheaper
IMAGE_RANGES = {
    "adc_drop": (0.40, 0.55),
    "t1_drop": (0.25, 0.40),
    "flair_gain": (0.40, 0.70),
}
DWI_DIRECTIONS = 3  # a clinical trace acquisition
MCA_SUPERIOR = ["caudalmiddlefrontal", "rostralmiddlefrontal", "parsopercularis", "parstriangularis",
                "parsorbitalis", "lateralorbitofrontal", "precentral", "postcentral", "supramarginal", "insula"]
MCA_INFERIOR = ["superiortemporal", "middletemporal", "inferiortemporal", "bankssts", "transversetemporal",
                "inferiorparietal", "supramarginal", "insula"]
MCA_DEEP = ["putamen", "pallidum", "caudate"]


def draw_parameters(rng) -> dict:
    imaging = float(np.round(rng.uniform(1.0, 6.0), 2))
    reperfused = rng.uniform() >= 0.35
    return {
        "side": str(rng.choice(["L", "R"])),
        "occlusion": str(rng.choice(["M1", "M2-superior", "M2-inferior"])),
        "inflow_scale": float(rng.uniform(0.1, 0.45)),
        "collateral_strength": float(rng.uniform(0.3, 0.8)),
        "collateral_tau_h": float(rng.uniform(1.0, 4.0)),
        "onset_to_imaging_h": imaging,
        "onset_to_reperfusion_h": float(np.round(rng.uniform(imaging + 0.5, imaging + 8.0), 2)) if reperfused else None,
        "followup_h": FOLLOWUP_H,
        "sensitivity": float(np.exp(rng.uniform(*np.log(SENSITIVITY_RANGE)))),
        "image": {k: float(rng.uniform(*r)) for k, r in IMAGE_RANGES.items()},
    }


def territory_mask(anat: SubjectAnatomy, side: str, occlusion: str) -> np.ndarray:
    labels = {"M1": MCA_SUPERIOR + MCA_INFERIOR + MCA_DEEP, "M2-superior": MCA_SUPERIOR,
              "M2-inferior": MCA_INFERIOR}[occlusion]
    regions = anat.regions.set_index("name")
    ids = [int(regions.loc[f"{side}_{lab}", "id"]) for lab in set(labels)]
    _, nearest = ndimage.distance_transform_edt(anat.atlas == 0, return_indices=True)
    nearest_label = anat.atlas[tuple(nearest)]
    return anat.brain & np.isin(nearest_label, ids)


def perfusion_maps(anat: SubjectAnatomy, territory: np.ndarray, inflow_scale: float):
    spacing = (anat.voxel_mm,) * 3
    common = dict(gm=anat.gm, wm=anat.wm, spacing=spacing, permeability=PERMEABILITY, tol=DARCY_TOL)
    normal = darcy_perfusion(anat.brain, **common)
    acute = darcy_perfusion(anat.brain, inflow_territory=territory, inflow_scale=inflow_scale, **common)
    return normal, acute


def collateral_weight(anat: SubjectAnatomy, territory: np.ndarray) -> np.ndarray:
    depth = ndimage.distance_transform_edt(territory, sampling=(anat.voxel_mm,) * 3)
    return np.where(territory, np.exp(-depth / COLLATERAL_LENGTH_MM), 0.0)


def cbf_at(t_h: float, acute, normal, weight, params, *, hidden=True):
    if params["onset_to_reperfusion_h"] is not None and t_h >= params["onset_to_reperfusion_h"]:
        return normal
    if not hidden:
        return acute
    gain = params["collateral_strength"] * (1.0 - np.exp(-t_h / params["collateral_tau_h"]))
    return acute + gain * weight * (normal - acute)


def tissue_death(acute, normal, weight, wm, params, save_h, *, hidden=True):
    """Dead fraction at each time in save_h (sorted), on the voxels of the arrays given (1D)."""
    boundaries = sorted(set(np.arange(0.0, 24.0 + 1e-9, SEGMENT_H).tolist() + list(save_h)
                            + ([params["onset_to_reperfusion_h"]] if params["onset_to_reperfusion_h"] else [])
                            + [params["followup_h"]]))
    boundaries = [b for b in boundaries if b <= params["followup_h"] + 1e-9]
    dead = np.zeros_like(acute)
    toxic = np.zeros_like(acute)
    saved = {}
    for a, b in zip(boundaries[:-1], boundaries[1:]):
        # after 24 h the collateral gain has saturated (tau <= 6 h): one segment to follow-up
        cbf = cbf_at(0.5 * (a + b) if b <= 24.0 else b, acute, normal, weight, params, hidden=hidden)
        res = simulate_tissue_death(cbf, hours=b - a, wm_fraction=wm, dead0=dead, toxic0=toxic, dt_s=DEATH_DT_S,
                                    threads=1)
        dead, toxic = res["dead"], res["toxic"]
        for s in save_h:
            if abs(s - b) < 1e-9:
                saved[s] = dead.copy()
    return [saved[s] for s in save_h]


def simulate_subject(anat: SubjectAnatomy, rng, *, hidden: bool = True, params: dict | None = None) -> dict:
    params = params or draw_parameters(rng)
    territory = territory_mask(anat, params["side"], params["occlusion"])
    normal, acute0 = perfusion_maps(anat, territory, params["inflow_scale"])
    weight = collateral_weight(anat, territory)
    sigma = float(params.get("sensitivity", TISSUE_SENSITIVITY))
    # only voxels the occlusion actually starves need the ODE: flow clearly below the voxel's own
    # normal value, mostly tissue (a CSF-dominated voxel has a low CBF per 100 ml of voxel without
    # being ischaemic), and a non-negligible hypoxic fraction (flow only rises afterwards)
    active = (anat.brain & (acute0 < 0.9 * normal) & (anat.gm + anat.wm >= 0.5)
              & (hypoxic_fraction(acute0 / sigma, anat.wm) > 1e-3))
    t_img = params["onset_to_imaging_h"]
    # the tissue sees CBF / sigma at every time (cbf_at is linear in both maps)
    dead_img, dead_fu = tissue_death(acute0[active] / sigma, normal[active] / sigma, weight[active], anat.wm[active],
                                     params, [t_img, params["followup_h"]], hidden=hidden)
    cbf_img = cbf_at(t_img, acute0, normal, weight, params, hidden=hidden)
    return {"params": params, "territory": territory, "cbf_normal": normal, "cbf_onset": acute0,
            "cbf_imaging": cbf_img, "dead_imaging": _scatter(dead_img, active), "dead_followup": _scatter(dead_fu, active)}


def _scatter(values, mask):
    out = np.zeros(mask.shape)
    out[mask] = values
    return out


def write_subject(subject: str, anat: SubjectAnatomy, rng, bids_root, truth_dir) -> dict:
    sim = simulate_subject(anat, rng)
    params = sim["params"]
    aff = anat.affine
    observed = np.where(anat.brain, np.clip(sim["cbf_imaging"] + rng.normal(0.0, CBF_NOISE, anat.shape), 0.0, None), 0.0)
    cbf_path = bids.session_path(bids_root, subject, "acute", "perf", "cbf")
    bids.write_image(cbf_path, observed, aff)
    bids.write_json_sidecar(cbf_path, {"Units": "mL/100g/min", "Description": "cerebral blood flow at acute imaging",
                                       "Manufacturer": "neurohybrid-synth"})
    ref = wm_reference(anat)
    t1, _ = observe_image(anat.t1, anat, rng, reference_intensity=ref)
    t1_path = bids.session_path(bids_root, subject, "acute", "anat", "T1w")
    bids.write_mr_image(t1_path, t1, aff)
    bids.write_json_sidecar(t1_path, bids.anat_sidecar("T1w"))
    # the acute core as diffusion imaging shows it
    from neurohybrid.synth.dwi import write_dwi

    im = params["image"]
    params["dwi"] = write_dwi(subject, "acute", anat, rng, bids_root, truth_dir, n_directions=DWI_DIRECTIONS,
                              md_scale=1.0 - im["adc_drop"] * sim["dead_imaging"])
    # the follow-up session: the final infarct on T1w and FLAIR
    dead = sim["dead_followup"]
    fl_clean = flair_image(anat, im["flair_gain"] * dead, ref)
    for suffix, clean in (("T1w", anat.t1 * (1.0 - im["t1_drop"] * dead)), ("FLAIR", fl_clean)):
        img, _ = observe_image(clean, anat, rng, reference_intensity=ref)
        path = bids.session_path(bids_root, subject, "followup", "anat", suffix)
        bids.write_mr_image(path, img, aff)
        bids.write_json_sidecar(path, bids.anat_sidecar(suffix))
    bids.write_mask(bids.lesion_path(bids_root, subject, "acute", "infarct"), sim["dead_imaging"] > CORE_THRESHOLD, aff)
    bids.write_mask(bids.lesion_path(bids_root, subject, "followup", "infarct"), sim["dead_followup"] > CORE_THRESHOLD,
                    aff)
    bids.write_sessions(bids_root, subject, "stroke", [("acute", params["onset_to_imaging_h"]),
                                                       ("followup", params["followup_h"])])
    sub = truth_dir / f"sub-{subject}"
    for name in ("cbf_normal", "cbf_onset", "cbf_imaging", "dead_imaging", "dead_followup"):
        desc = name.replace("_", "")
        bids.write_image(sub / f"sub-{subject}_desc-{desc}_map.nii.gz", sim[name], aff)
    bids.write_mask(sub / f"sub-{subject}_desc-territory_mask.nii.gz", sim["territory"], aff)
    return {**params, "sensitivity": float(params.get("sensitivity", TISSUE_SENSITIVITY))}
