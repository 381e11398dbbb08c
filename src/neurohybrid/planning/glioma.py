"""Glioma radiotherapy targets: the standard margin CTV and a personalised CTV of equal volume.

Standard target: the visible tumour at the last observed session (FLAIR or T1Gd) grown by a margin
(``planning.glioma.margin_mm``, 15 mm by default, the usual glioblastoma CTV margin) with a
Euclidean distance transform in mm (anisotropic voxels included), clipped to the brain.

Personalised target: the iso-surface of the family's inferred tumour cell density enclosing the
same volume as the standard target, i.e. the N voxels of highest density where N is the standard
target's voxel count (as in GliODIL, Balcerak et al., which compares coverage at equal volume). The
density is the one the family forecasts for the follow-up day (its ``desc-celldensity`` NIfTI: the
model fitted to the sessions before the held-out one, advanced to that day; it includes the part
of the tumour below the imaging thresholds). Ties, including the zero density far from the
tumour, are broken by the distance to the visible tumour, so a density that is a function of that
distance only gives back the standard target exactly.

Both masks are written on the subject's model grid (``res-model``, the grid of every forecast and
of the equal-volume comparison) and, given the preprocessing folder, also in the subject's own T1w
space (``space-T1w``: the template-to-T1w transforms of preprocessing, linear interpolation of the
mask thresholded at 0.5, as preprocessing resamples masks; volumes there agree to the resampling).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from neurohybrid.errors import InputError

DEFAULT_MARGIN_MM = 15.0


def brain_mask(wm, gm, csf) -> np.ndarray:
    """Brain = GM + WM + CSF probability > 0.5, holes filled (ventricles inside the brain count)."""
    return ndimage.binary_fill_holes((np.asarray(wm) + np.asarray(gm) + np.asarray(csf)) > 0.5)


def distance_to(mask: np.ndarray, spacing) -> np.ndarray:
    """Euclidean distance in mm from every voxel to ``mask`` (0 inside)."""
    if not mask.any():
        raise InputError("no visible tumour at the last session: no target to plan around")
    return ndimage.distance_transform_edt(~mask, sampling=tuple(float(v) for v in spacing))


def standard_target(visible: np.ndarray, brain: np.ndarray, dist: np.ndarray, margin_mm: float) -> np.ndarray:
    """The visible tumour grown by ``margin_mm`` and clipped to the brain (``dist``: the distance in
    mm to the visible tumour, ``distance_to``); the visible tumour itself is always inside."""
    return ((dist <= float(margin_mm)) & brain) | visible


def personalised_target(density: np.ndarray, n_voxels: int, allowed: np.ndarray, tie_break: np.ndarray) -> tuple[np.ndarray, float]:
    """The ``n_voxels`` voxels of ``allowed`` with the highest density (ties: smallest ``tie_break``),
    and the density at the iso-surface (the lowest density inside). Equal volume to the reference
    target by construction."""
    density = np.asarray(density, np.float64)
    idx = np.flatnonzero(allowed)
    n = int(min(n_voxels, idx.size))
    # lexsort: last key first; rank by density descending, then distance ascending
    order = np.lexsort((tie_break.ravel()[idx], -density.ravel()[idx]))[:n]
    out = np.zeros(density.shape, bool)
    out.ravel()[idx[order]] = True
    level = float(density.ravel()[idx[order[-1]]]) if n else float("nan")
    return out, level


def plan_subject(inputs, densities: dict[str, np.ndarray], margin_mm: float) -> dict:
    """Targets for one subject from its model inputs (cropped grid) and each family's cell density
    (same cropped grid). Returns dict(standard=mask, personalised={family: mask}, rows=[...],
    seconds={...})."""
    a = inputs.arrays
    spacing = tuple(float(v) for v in inputs.meta["voxel_mm"])
    t0 = time.perf_counter()
    visible = np.asarray(a["flair"][-1], bool) | np.asarray(a["t1gd"][-1], bool)
    if not visible.any():
        raise InputError("the last input session's FLAIR and T1Gd masks are empty: no visible tumour to plan around",
                         subject=inputs.subject)
    brain = brain_mask(a["wm"], a["gm"], a["csf"]) | visible
    dist = distance_to(visible, spacing)
    standard = standard_target(visible, brain, dist, margin_mm)
    n = int(standard.sum())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = [("standard_margin", "ctv_volume", n * voxel_ml, "ml"),
            ("standard_margin", "margin", float(margin_mm), "mm"),
            ("standard_margin", "visible_tumour_volume", float(visible.sum()) * voxel_ml, "ml")]
    seconds = {"standard_margin": time.perf_counter() - t0}
    personalised = {}
    for family, u in densities.items():
        t1 = time.perf_counter()
        if u.shape != visible.shape:
            raise InputError(f"{family} cell density has shape {u.shape}, the inputs' grid {visible.shape}", subject=inputs.subject)
        mask, level = personalised_target(u, n, brain, dist)
        personalised[family] = mask
        seconds[family] = time.perf_counter() - t1
        outside = mask & ~standard
        rows += [(family, "ctv_volume", float(mask.sum()) * voxel_ml, "ml"),
                 (family, "iso_density", level, "fraction of carrying capacity"),
                 (family, "overlap_with_standard", float((mask & standard).sum()) / max(n, 1), "fraction"),
                 (family, "volume_beyond_margin", float(outside.sum()) * voxel_ml, "ml"),
                 (family, "visible_tumour_covered", float((mask & visible).sum()) / float(visible.sum()), "fraction")]
    return dict(standard=standard, personalised=personalised, rows=rows, seconds=seconds)


def density_families(forecast_dir: Path, subject: str, families) -> dict[str, Path]:
    """The families whose forecast has a cell density (a mechanistic state): mechanistic and the hybrids."""
    out = {}
    for fam in families:
        p = Path(forecast_dir) / f"sub-{subject}_model-{fam}_desc-celldensity.nii.gz"
        if p.exists():
            out[fam] = p
    return out


def ctv_path(out_dir: Path, subject: str, model: str) -> Path:
    return Path(out_dir) / f"sub-{subject}_model-{model}_desc-ctv_mask.nii.gz"


def to_subject_space(mask: np.ndarray, affine: np.ndarray, preproc: Path, subject: str):
    """A model-grid mask in the subject's T1w space (nibabel image, uint8), through preprocessing's
    template-to-T1w transforms (ANTs; the FSL backend's warps are not supported here: InputError)."""
    import nibabel as nib

    from neurohybrid.io import load_image
    from neurohybrid.preprocessing import ants_backend as ab
    from neurohybrid.preprocessing.layout import Derivatives

    d = Derivatives(Path(preproc), subject)
    for path in [d.preproc_t1w, *d.inverse_transforms]:
        if not Path(path).exists():
            raise InputError("preprocessing output not found (needed for the T1w-space target)", file=path, subject=subject)
    sidecar = Path(f"{d.xfm_inverse_stem}.json")
    if sidecar.exists() and "FSL" in sidecar.read_text():
        raise InputError("T1w-space targets need ANTs transforms (preprocessing backend ants)", file=sidecar, subject=subject)
    t1 = load_image(d.preproc_t1w, subject=subject)
    moving = nib.Nifti1Image(np.asarray(mask, np.float32), np.asarray(affine, np.float64))
    out = ab.apply(ab.to_ants(moving), ab.to_ants(t1), d.inverse_transforms, interpolator="linear",
                   invert=ab.INVERSE_INVERT).numpy()
    return nib.Nifti1Image((out >= 0.5).astype(np.uint8), t1.affine)


def ctv_path_t1w(out_dir: Path, subject: str, model: str) -> Path:
    return Path(out_dir) / f"sub-{subject}_model-{model}_space-T1w_desc-ctv_mask.nii.gz"
