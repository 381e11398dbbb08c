"""Glioma virtual patients: Fisher-Kolmogorov growth on the subject's true tissue maps.

Plain model (what ``neurohybrid.solvers.glioma`` computes): du/dt = div(D grad u) + rho u (1 - u),
D = dw (P_wm + P_gm / 10).

HIDDEN MECHANISM (what the generator adds and the plain model lacks): proliferation is not uniform.
rho(x) = rho * (1 + a * m(x)), m(x) = 2 exp(-d_v(x) / 15 mm) - 1 in [-1, 1], where d_v is the
distance to the ventricles (deep CSF: CSF probability > 0.5 more than 15 mm inside the brain mask);
tumour cells near the subventricular zone proliferate faster, far from it slower. a ~ U(0.3, 0.6)
per subject. The ventricles are visible on T1w, so the modulation is learnable across subjects.
It is integrated by Lie operator splitting: the solver advances the plain model (with the base
rho) over 20-day chunks, and after each chunk the extra logistic reaction rho a m(x) u (1 - u) is
applied with its exact solution.

Observation: T1Gd = u + e >= theta_T1Gd, FLAIR = u + e >= theta_FLAIR (e a smooth random field
of amplitude 0.02, new at each session; thresholds drawn per subject). The images (``clean_images``,
parameters in IMAGE_RANGES): T1w hypointense over the tumour, darkest in a necrotic core
(u >= theta_necrosis); contrast T1w with an enhancing rim (the T1Gd-visible tumour outside the
core); FLAIR hyperintense oedema beyond the enhancing tumour. Mass effect
(``synth.mass_effect``): at every session the anatomy, the tumour and the images are displaced
by a smooth radial diffeomorphism that grows with the tumour's volume; the truth anatomy (tissue
maps, labels, template warp) is the first session's, displaced. Timeline: the seed (a 3 mm
Gaussian in deep WM) grows unseen until its T1Gd-visible volume first passes a target drawn from
clinical preoperative volumes (T1GD_TARGET_ML; the volume the image shows, mass effect included):
that is day 0; sessions follow at SESSION2_DAYS and SESSION3_DAYS.

Radiotherapy (treated patients, chosen by ``synth.cohort``): a standard course, 30 fractions of
2 Gy, 5 a week (Stupp et al. 2005, NEJM 352:987), starting 7-21 days after the session before
treatment, on a target = the tumour visible on FLAIR at that session (u >= theta_FLAIR, without
the observation noise) + a 15 mm margin, clipped to the brain. Each fraction multiplies u inside
the target by exp(-(alpha d + beta d^2)) (the solver's ``Radiotherapy``). alpha is drawn per
patient, log-uniform in RT_ALPHA_RANGE, with alpha/beta = 10 Gy as in patient-specific glioma
response models (Rockne et al. 2010, Phys Med Biol 55:3271). The range is ours, below the solver's
default 0.035/Gy and far below clinical tumour-control estimates such as Pedicini et al. 2014's
0.12 (0.10-0.14)/Gy (Strahlenther Onkol 190:925; with concurrent temozolomide), which describe the
kill of clonogens, not of the imaged density: u is at most 1 (the carrying capacity) and the FLAIR
threshold 0.15-0.35, so a course's survival exp(-30 (2 alpha + 4 beta)) must stay near or above it
for the tumour to remain visible, as glioblastomas do after radiotherapy; over 30 x 2 Gy the range
gives a survival of 0.70-0.11 (measured at 4 mm: alpha 0.028 left no FLAIR voxel 60 days after
the course started, at a growth rate of 0.016/day). The draws come from their own random stream
(``simulate_subject(treatment_rng=...)``): a patient's growth parameters, images and noise draws
are those it would have untreated.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neurohybrid.solvers.glioma import gaussian_seed, simulate_glioma
from neurohybrid.synth import bids, mass_effect
from neurohybrid.synth.anatomy import (SubjectAnatomy, flair_image, observe_image, smooth_random_field,
                                      wm_reference)

CHUNK_DAYS = 20.0
FINE_CHUNK_DAYS = 2.0
MAX_PRE_DAYS = 2000.0
# literature ranges (DATA.md): dw 0.035-0.3 mm^2/day, rho 0.01-0.2 /day; the pair is redrawn until
# the Fisher wave speed 2 sqrt(dw rho) lies in SPEED_RANGE. Its lower end is the slowest the
# literature ranges allow (2 sqrt(0.035 x 0.01) = 0.037 mm/day); its upper end keeps the lesion's
# growth within a few times that of untreated glioblastoma before surgery (median 0.18 ml/day of
# total lesion volume in 95 patients, Ellingson et al. 2016, Cancer 122:1718): a 30 mm radius
# front moving 0.04-0.1 mm/day adds 0.45-1.1 ml/day, so these virtual tumours grow faster than the
# median patient's
DW_RANGE = (0.035, 0.3)
RHO_RANGE = (0.01, 0.2)
SPEED_RANGE = (0.04, 0.1)
# follow-up sessions (days after the first): at least 4 weeks apart, the interval over which
# growth of untreated glioblastoma is detectable (Ellingson et al. 2016), short enough that the
# lesion stays within clinical sizes
SESSION2_DAYS = (45, 90)
SESSION3_DAYS = (110, 170)
THETA_T1GD = (0.45, 0.85)
THETA_FLAIR = (0.15, 0.35)
# the tumour at the first session: its contrast-enhancing volume (enhancing rim + necrotic core,
# u >= theta_T1Gd) drawn log-uniform over the interquartile range of preoperative enhancing volumes
# of 61 glioblastoma patients, 8.2-41.7 ml (median 18.2 ml; World Neurosurg 2018;115:e448, PMID
# 29678715)
T1GD_TARGET_ML = (8.2, 41.7)
# image appearance, drawn per patient (uniform): the necrotic core is where u >= theta_necrosis;
# T1w intensity x (1 - drop) in oedema (FLAIR-visible), solid tumour (T1Gd-visible) and necrosis,
# the drops adding up (a hypointense tumour, darkest in the core: T1w core < WM); contrast T1w
# adds enhancement x the WM intensity on the solid tumour outside the core (an enhancing rim); these
# ranges are ours, chosen so the contrasts look like the usual appearance of a glioblastoma
IMAGE_RANGES = {
    "theta_necrosis": (0.93, 0.98),
    "t1_drop_oedema": (0.08, 0.15),
    "t1_drop_tumour": (0.10, 0.20),
    "t1_drop_necrosis": (0.15, 0.30),
    "enhancement": (0.40, 0.60),
}
RT_ALPHA_RANGE = (0.005, 0.03)  # 1/Gy, log-uniform (see the module docstring for the sources)
RT_ALPHA_BETA_GY = 10.0
RT_FRACTIONS, RT_DOSE_GY, RT_PER_WEEK = 30, 2.0, 5
RT_START_DELAY_DAYS = (7, 21)
RT_MARGIN_MM = 15.0
MAX_RHO_DT = 0.1  # solver step bound rho*dt <= 0.1 (its default is 0.05): halves the cost, error << noise


def draw_parameters(rng) -> dict:
    while True:
        dw = float(np.exp(rng.uniform(*np.log(DW_RANGE))))
        rho = float(np.exp(rng.uniform(*np.log(RHO_RANGE))))
        if SPEED_RANGE[0] <= 2 * np.sqrt(dw * rho) <= SPEED_RANGE[1]:
            break
    return {
        "dw": dw,
        "rho": rho,
        "dg_ratio": 0.1,
        "theta_t1gd": float(rng.uniform(*THETA_T1GD)),
        "theta_flair": float(rng.uniform(*THETA_FLAIR)),
        "hidden_rho_amplitude": float(rng.uniform(0.3, 0.6)),
        "hidden_length_mm": 15.0,
        "t1gd_target_ml": float(np.exp(rng.uniform(*np.log(T1GD_TARGET_ML)))),
        "session_days": [0.0, float(np.round(rng.uniform(*SESSION2_DAYS))), float(np.round(rng.uniform(*SESSION3_DAYS)))],
        "mass_effect_fraction": float(rng.uniform(*mass_effect.FRACTION_RANGE)),
        "image": {k: float(rng.uniform(*r)) for k, r in IMAGE_RANGES.items()},
    }


def draw_treatment(rng, session_days, after_session: int) -> dict:
    """A radiotherapy course starting 7-21 days after session ``after_session`` (0-based), with this
    patient's radiosensitivity; days since the first session."""
    alpha = float(np.exp(rng.uniform(*np.log(RT_ALPHA_RANGE))))
    start = float(session_days[after_session] + np.round(rng.uniform(*RT_START_DELAY_DAYS)))
    return {"alpha": alpha, "beta": alpha / RT_ALPHA_BETA_GY, "alpha_beta_gy": RT_ALPHA_BETA_GY,
            "start_day": start, "fractions": RT_FRACTIONS, "dose_per_fraction_gy": RT_DOSE_GY,
            "fractions_per_week": RT_PER_WEEK, "after_session": int(after_session), "margin_mm": RT_MARGIN_MM}


def treatment_target(u: np.ndarray, anat: SubjectAnatomy, params: dict, margin_mm: float) -> np.ndarray:
    """The visible tumour (FLAIR threshold, noise-free) + margin_mm, clipped to the brain."""
    visible = (u >= params["theta_flair"]) & anat.brain
    if not visible.any():
        return visible
    dist = ndimage.distance_transform_edt(~visible, sampling=(anat.voxel_mm,) * 3)
    return (dist <= margin_mm) & anat.brain


def ventricle_modulation(anat: SubjectAnatomy, length_mm: float = 15.0) -> np.ndarray:
    """m(x) in [-1, 1]: +1 at the ventricles, falling to -1 far away (the hidden proliferation field)."""
    sampling = (anat.voxel_mm,) * 3
    depth = ndimage.distance_transform_edt(anat.brain, sampling=sampling)
    ventricles = (anat.csf > 0.5) & (depth > 15.0)
    if not ventricles.any():  # coarse grids: fall back to the deepest CSF
        ventricles = (anat.csf > 0.3) & (depth >= np.percentile(depth[anat.brain], 90))
    dist = ndimage.distance_transform_edt(~ventricles, sampling=sampling)
    return 2.0 * np.exp(-dist / length_mm) - 1.0


def pick_seed(anat: SubjectAnatomy, rng) -> tuple[int, int, int]:
    """A deep white-matter voxel of the cerebral hemispheres (template z > 0 mm, |x| > 15 mm)."""
    pts = anat.template_points()
    ok = (anat.wm > 0.9) & (pts[..., 2] > 0) & (np.abs(pts[..., 0]) > 15) & (pts[..., 1] > -70) & (pts[..., 1] < 40)
    depth = ndimage.distance_transform_edt(anat.wm > 0.5, sampling=(anat.voxel_mm,) * 3)
    ok &= depth >= min(6.0, depth[ok].max() if ok.any() else 0.0)
    cand = np.argwhere(ok)
    return tuple(int(v) for v in cand[rng.integers(len(cand))])


def _box(mask: np.ndarray, pad: int):
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _logistic(u: np.ndarray, rate_dt: np.ndarray) -> np.ndarray:
    """Exact solution of du/dt = r u (1 - u) after time dt (rate_dt = r dt, any sign)."""
    e = np.exp(rate_dt)
    return u * e / (1.0 - u + u * e)


def grow(anat: SubjectAnatomy, u0: np.ndarray, params: dict, days: float, modulation: np.ndarray | None,
         *, stop_t1gd_ml: float | None = None, radiotherapy=None, chunk_days: float = CHUNK_DAYS):
    """Advance u by `days` in chunks of `chunk_days`; returns (u, elapsed). With stop_t1gd_ml, stops
    where the T1Gd-visible volume first reaches it (the chunk that crosses it is redone in 2-day
    chunks, so the first session's size is the drawn one within 2 days of growth).
    radiotherapy: a solver ``Radiotherapy`` on the full grid, fraction days counted from the start
    of this call."""
    spacing = (anat.voxel_mm,) * 3
    wm, gm = anat.wm.astype(np.float32), anat.gm.astype(np.float32)
    u = u0.astype(np.float32)
    elapsed = 0.0
    voxel_ml = anat.voxel_mm**3 / 1000.0
    while elapsed < days - 1e-9:
        step = min(chunk_days, days - elapsed)
        before = u
        # speed device: solve only in a box around the tumour (u > 1e-6) padded by more than the
        # distance the front and diffusion can travel in one chunk; outside, u stays below ~1e-6
        pad_mm = 20.0 + 2.0 * np.sqrt(params["dw"] * params["rho"]) * step + 6.0 * np.sqrt(params["dw"] * step)
        box = _box(u > 1e-6, int(np.ceil(pad_mm / anat.voxel_mm)))
        rt = None if radiotherapy is None else radiotherapy.window(elapsed, elapsed + step, box)
        ub = simulate_glioma(wm[box], gm[box], u[box], spacing=spacing, dw=params["dw"], rho=params["rho"],
                             days=step, dg_ratio=params["dg_ratio"], max_rho_dt=MAX_RHO_DT, threads=1,
                             radiotherapy=rt if rt is not None and rt.days else None)
        if modulation is not None:
            extra = params["rho"] * params["hidden_rho_amplitude"] * modulation[box] * step
            ub = _logistic(np.clip(ub, 0.0, 1.0).astype(np.float64), extra).astype(np.float32)
        u = np.zeros_like(u)
        u[box] = ub
        elapsed += step
        # the image shows the tumour inflated by its mass effect (synth.mass_effect): 1 + fraction
        seen_ml = (u >= params["theta_t1gd"]).sum() * voxel_ml * (1.0 + params.get("mass_effect_fraction", 0.0))
        if stop_t1gd_ml is not None and seen_ml >= stop_t1gd_ml:
            if chunk_days > FINE_CHUNK_DAYS:
                u, part = grow(anat, before, params, step, modulation, stop_t1gd_ml=stop_t1gd_ml,
                               chunk_days=FINE_CHUNK_DAYS)
                elapsed += part - step
            break
    return u, elapsed


def simulate_subject(anat: SubjectAnatomy, rng, *, hidden: bool = True, treatment_rng=None,
                     treat_after_session: int | None = None) -> dict:
    """True fields and parameters of one glioma subject (no file writing). With
    ``treat_after_session`` (0-based) the patient gets a radiotherapy course after that session,
    drawn from ``treatment_rng`` (never from ``rng``: the rest of the patient stays as untreated)."""
    from neurohybrid.solvers.glioma import Radiotherapy

    params = draw_parameters(rng)
    seed = pick_seed(anat, rng)
    modulation = ventricle_modulation(anat, params["hidden_length_mm"]) if hidden else None
    u0 = gaussian_seed(anat.shape, (anat.voxel_mm,) * 3, seed, sigma_mm=3.0, amplitude=0.5)
    u, pre_days = grow(anat, u0, params, MAX_PRE_DAYS, modulation, stop_t1gd_ml=params["t1gd_target_ml"])
    states = [u]
    days = params["session_days"]
    course, rt, target = None, None, None
    for k, (a, b) in enumerate(zip(days[:-1], days[1:])):
        if treat_after_session is not None and k == treat_after_session:
            course = draw_treatment(treatment_rng, days, k)
            target = treatment_target(u, anat, params, course["margin_mm"])
            fraction_days = [course["start_day"] + 7.0 * (j // RT_PER_WEEK) + j % RT_PER_WEEK for j in range(RT_FRACTIONS)]
            course["fraction_days"] = fraction_days
            rt = Radiotherapy(fraction_days, RT_DOSE_GY, course["alpha"], course["beta"], target)
        u, _ = grow(anat, u, params, b - a, modulation, radiotherapy=None if rt is None else rt.window(a, b))
        states.append(u)
    params.update(seed_voxel=list(seed), pre_diagnosis_days=pre_days, hidden_mechanism=hidden)
    if course is not None:  # untreated patients' truth stays as it was
        params["treatment"] = course
    return {"params": params, "states": states, "modulation": modulation, "u_seed": u0, "rt_target": target}


def observe_masks(u: np.ndarray, brain: np.ndarray, voxel_mm: float, params: dict, rng):
    """The annotated T1Gd and FLAIR masks: u plus a smooth random field of amplitude 0.02 (new at
    each session), thresholded, inside the brain."""
    noise = 0.02 * smooth_random_field(u.shape, voxel_mm, rng, smooth_mm=6.0)
    seen = np.where(brain, u + noise, 0.0)
    return seen >= params["theta_t1gd"], seen >= params["theta_flair"]


def _soft(u, theta, width=0.05):
    return 1.0 / (1.0 + np.exp(-(u - theta) / width))


def clean_images(anat: SubjectAnatomy, u: np.ndarray, params: dict) -> dict[str, np.ndarray]:
    """Noise-free T1w, contrast T1w and FLAIR of the undisplaced anatomy with tumour density u:
    a T1-hypointense tumour, darkest in its necrotic core; an enhancing rim (the solid tumour outside
    the core) on contrast T1w; FLAIR hyperintense oedema beyond the enhancing tumour."""
    im = params["image"]
    ref = wm_reference(anat)
    u64 = u.astype(np.float64)
    oedema, solid = _soft(u64, params["theta_flair"]), _soft(u64, params["theta_t1gd"])
    necrosis = _soft(u64, im["theta_necrosis"], width=0.01)
    t1 = anat.t1 * (1.0 - im["t1_drop_oedema"] * oedema - im["t1_drop_tumour"] * solid - im["t1_drop_necrosis"] * necrosis)
    ce = t1 + im["enhancement"] * ref * np.clip(solid - necrosis, 0.0, 1.0) * anat.brain
    fl = flair_image(anat, 0.6 * oedema, ref)
    return {"T1w": t1, "ceT1w": ce, "FLAIR": fl}


def write_subject(subject: str, anat: SubjectAnatomy, rng, bids_root, truth_dir, *, treatment_rng=None,
                  treat_after_session: int | None = None) -> tuple[dict, SubjectAnatomy]:
    """Write one glioma patient's sessions; returns its parameters and the anatomy as the first
    session shows it (displaced by that session's mass effect: the truth the preprocessing of that
    session's T1w is scored against)."""
    sim = simulate_subject(anat, rng, treatment_rng=treatment_rng, treat_after_session=treat_after_session)
    params = sim["params"]
    ref = wm_reference(anat)
    sessions, effects, displacements = [], [], []
    truth_sub = truth_dir / f"sub-{subject}"
    for k, (day, u) in enumerate(zip(params["session_days"], sim["states"])):
        ses = f"{k + 1:02d}"
        sessions.append((ses, day))
        disp, effect = mass_effect.displacement(u, anat.brain, anat.voxel_mm, params["mass_effect_fraction"])
        effects.append(dict(effect, session=ses))
        displacements.append(disp)
        brain = mass_effect.pull_back(anat.brain, disp, 0)
        seen_u = (np.clip(mass_effect.pull_back(u, disp), 0.0, 1.0) * brain).astype(np.float32)
        t1gd, flair = observe_masks(seen_u, brain, anat.voxel_mm, params, rng)
        clean = {name: mass_effect.pull_back(img, disp) for name, img in clean_images(anat, u, params).items()}
        for suffix, key, entities in (("T1w", "T1w", ""), ("T1w", "ceT1w", "ce-gadolinium"), ("FLAIR", "FLAIR", "")):
            img, _ = observe_image(clean[key], anat, rng, reference_intensity=ref)
            path = bids.session_path(bids_root, subject, ses, "anat", suffix, entities=entities)
            bids.write_mr_image(path, img, anat.affine)
            bids.write_json_sidecar(path, bids.anat_sidecar(
                suffix, {"ContrastBolusIngredient": "GADOLINIUM"} if entities else None))
        bids.write_mask(bids.lesion_path(bids_root, subject, ses, "T1Gd"), t1gd, anat.affine)
        bids.write_mask(bids.lesion_path(bids_root, subject, ses, "FLAIR"), flair, anat.affine)
        bids.write_image(truth_sub / f"sub-{subject}_ses-{ses}_desc-tumour_density.nii.gz", seen_u, anat.affine)
        bids.write_image(truth_sub / f"sub-{subject}_ses-{ses}_desc-masseffect_xfm.nii.gz",
                         (disp * anat.voxel_mm).astype(np.float32), anat.affine)
    params["mass_effect"] = effects
    bids.write_image(truth_sub / f"sub-{subject}_desc-hiddenrho_modulation.nii.gz", sim["modulation"], anat.affine)
    bids.write_image(truth_sub / f"sub-{subject}_desc-seed_density.nii.gz", sim["u_seed"], anat.affine)
    bids.write_sessions(bids_root, subject, "glioma", sessions)
    course = params.get("treatment")
    if course is not None:
        from neurohybrid.disorders.glioma import treatment as rt

        ses = sessions[course["after_session"]][0]
        target = mass_effect.pull_back(sim["rt_target"], displacements[course["after_session"]], 0)
        bids.write_mask(bids.lesion_path(bids_root, subject, ses, rt.TARGET_DESC), target, anat.affine)
        rt.write_table(bids_root, subject, [rt.Course(course["start_day"], course["fractions"], course["dose_per_fraction_gy"],
                                                      course["fractions_per_week"], rt.target_path(subject, ses), ses)])
    return params, mass_effect.displaced_anatomy(anat, displacements[0])
