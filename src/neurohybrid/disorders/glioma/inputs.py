"""Glioma model inputs and targets, and writing forecasts back onto the res-model grid.

Inputs (``sub-S_desc-modelinputs.npz``): ``wm``, ``gm``, ``csf`` (float32, cropped to the template box),
``ventricle_mm`` (float32: distance to the subject's ventricles in mm, ``ventricle_distance``),
``t1gd``, ``flair`` (bool, (sessions, X, Y, Z), every session but the last).
Sidecar: ``sessions``, ``days`` (of the input sessions), ``target_session``, ``target_day`` (when to
forecast: the last session's day, its images are never read here), ``affine`` and ``full_shape``
(res-model grid), ``crop_offset``, ``voxel_mm``, ``ventricle_voxels`` and ``ventricle_rule``.
Treatment (``treatment``, the subject's ``sub-S_treatment.tsv``): ``rt_target`` (bool, (courses with a
target, X, Y, Z)) and in the sidecar ``treatment``: per course its ``fraction_days`` (days since the first
session), ``dose_per_fraction_gy``, ``target_index`` (into ``rt_target``, null: whole brain) and the table's
values; ``treated`` (also in the target's sidecar, for the cohort table).
Target (``sub-S_desc-target.npz``): ``t1gd``, ``flair`` (bool, full res-model grid); sidecar
``affine``, ``voxel_mm``, ``day``, ``session``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from neurohybrid.disorders.base import Forecast, SubjectData
from neurohybrid.disorders import voxel
from neurohybrid.errors import InputError
from neurohybrid.settings import resolve
from neurohybrid.io import save_volume
from neurohybrid.preprocessing.layout import raw_lesion


VENTRICLE_DEPTH_MM = 15.0  # CSF at least this deep inside the brain is ventricular, not sulcal/cisternal
VENTRICLE_CSF = 0.5
MAX_DISTANCE_MM = 120.0  # no ventricle found: every voxel this far away (the feature saturates)


def ventricle_distance(wm, gm, csf, spacing, exclude=None) -> tuple[np.ndarray, int, str]:
    """Distance (mm) of every voxel to the subject's ventricles, from its own segmentation.

    Ventricles = voxels whose CSF probability is > 0.5 and which lie more than 15 mm inside the
    brain (brain = GM + WM + CSF > 0.5, holes filled; depth = Euclidean distance transform to the
    outside of that mask): the deep CSF component, away from the sulci and cisterns at the outer
    surface. When no voxel passes (coarse grids, small brains), the deepest CSF is used instead
    (CSF > 0.3 within the deepest 10% of the brain). ``exclude`` (e.g. the tumour masks) is never a
    ventricle. Returns (distance, number of ventricle voxels, the rule that found them).
    """
    spacing = tuple(float(v) for v in spacing)
    brain = ndimage.binary_fill_holes((np.asarray(wm) + np.asarray(gm) + np.asarray(csf)) > 0.5)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    allowed = brain if exclude is None else brain & ~exclude
    vent = allowed & (csf > VENTRICLE_CSF) & (depth > VENTRICLE_DEPTH_MM)
    rule = f"CSF > {VENTRICLE_CSF} and depth > {VENTRICLE_DEPTH_MM} mm"
    if not vent.any() and brain.any():
        vent = allowed & (csf > 0.3) & (depth >= np.percentile(depth[brain], 90))
        rule = "CSF > 0.3 in the deepest 10% of the brain"
    if not vent.any():
        return np.full(brain.shape, MAX_DISTANCE_MM, np.float32), 0, "none found"
    dist = ndimage.distance_transform_edt(~vent, sampling=spacing)
    return np.minimum(dist, MAX_DISTANCE_MM).astype(np.float32), int(vent.sum()), rule


def build_inputs(subject: str, bids: Path, preproc: Path, config: dict) -> tuple[SubjectData, SubjectData]:
    sessions = voxel.read_sessions(bids, subject, "day")
    if len(sessions) < 2:
        raise InputError(f"glioma needs at least 2 sessions (earlier ones to fit, the last to forecast), found {len(sessions)}",
                         file=bids / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", subject=subject)
    reader = voxel.GridReader(subject)
    gm = reader.load(voxel.preproc_anat(preproc, subject, "GM"), value_range=(0.0, 1.0))
    wm = reader.load(voxel.preproc_anat(preproc, subject, "WM"), value_range=(0.0, 1.0))
    csf = reader.load(voxel.preproc_anat(preproc, subject, "CSF"), value_range=(0.0, 1.0))
    masks = {"T1Gd": [], "FLAIR": []}
    for ses, _ in sessions:
        for desc in masks:
            path = voxel.require_raw(voxel.preproc_mask(preproc, subject, ses, desc), raw_lesion(bids, subject, ses, desc), subject)
            masks[desc].append(reader.load(path, binary=True))
    first = voxel.preproc_mask(preproc, subject, sessions[0][0], "FLAIR")
    if not masks["FLAIR"][0].any() and not masks["T1Gd"][0].any():
        raise InputError("the first session's tumour masks are empty: nothing to seed the model from", file=first, subject=subject)
    courses, targets = _treatment(bids, preproc, subject, sessions, reader)
    offset, size = voxel.template_box(reader.shape, reader.affine, margin=int(resolve(config, "glioma")["crop_margin"]))
    vox = voxel.voxel_size(reader.affine)
    # the tumour (any input session) is never taken for a ventricle
    tumour = np.any(masks["FLAIR"][:-1], axis=0) | np.any(masks["T1Gd"][:-1], axis=0)
    vdist, n_vent, rule = ventricle_distance(wm, gm, csf, vox, exclude=tumour)
    meta = dict(
        sessions=[s for s, _ in sessions[:-1]], days=[d for _, d in sessions[:-1]],
        target_session=sessions[-1][0], target_day=sessions[-1][1],
        affine=np.asarray(reader.affine).tolist(), full_shape=list(reader.shape), crop_offset=list(offset),
        voxel_mm=list(vox), ventricle_voxels=n_vent, ventricle_rule=rule, treatment=courses, treated=bool(courses),
    )
    arrays = dict(
        wm=voxel.crop(wm, offset, size).astype(np.float32), gm=voxel.crop(gm, offset, size).astype(np.float32),
        csf=voxel.crop(csf, offset, size).astype(np.float32), ventricle_mm=voxel.crop(vdist, offset, size),
        t1gd=voxel.crop(np.stack(masks["T1Gd"][:-1]), offset, size), flair=voxel.crop(np.stack(masks["FLAIR"][:-1]), offset, size),
    )
    if targets:
        arrays["rt_target"] = voxel.crop(np.stack(targets), offset, size)
    inputs = SubjectData(subject, "glioma", arrays, meta)
    target = SubjectData(subject, "glioma", dict(t1gd=masks["T1Gd"][-1], flair=masks["FLAIR"][-1]),
                         dict(affine=meta["affine"], voxel_mm=list(vox), day=sessions[-1][1], session=sessions[-1][0],
                              treated=bool(courses)))
    return inputs, target


def _treatment(bids: Path, preproc: Path, subject: str, sessions, reader) -> tuple[list[dict], list[np.ndarray]]:
    """The treatment table's courses (fraction days since the first session) and their targets on the
    res-model grid (mapped there by preprocessing, like the lesion masks)."""
    from neurohybrid.disorders.glioma import treatment as rt

    courses, targets = [], []
    first = float(sessions[0][1])
    for c in rt.read_table(bids, subject, sessions):
        index = None
        if c.target_mask is not None:
            path = voxel.require_raw(voxel.preproc_mask(preproc, subject, c.target_session, rt.TARGET_DESC),
                                     Path(bids) / c.target_mask, subject)
            mask = reader.load(path, binary=True)
            if not mask.any():
                raise InputError("the radiotherapy target mask is empty on the model grid", file=path, subject=subject)
            index = len(targets)
            targets.append(mask)
        courses.append(dict(c.row(), fraction_days=[d - first for d in c.fraction_days()], target_index=index))
    return courses, targets


def cropped_target(inputs: SubjectData, target: SubjectData) -> dict[str, np.ndarray]:
    """The target masks cut to the inputs' crop box (for training)."""
    offset, size = inputs.meta["crop_offset"], inputs.arrays["wm"].shape
    out = {}
    for key in ("t1gd", "flair"):
        arr = np.asarray(target.arrays[key]).astype(bool)
        if list(arr.shape) != list(inputs.meta["full_shape"]):
            raise InputError(f"target {key} has shape {arr.shape}, inputs grid {inputs.meta['full_shape']}", subject=target.subject)
        out[key] = voxel.crop(arr, offset, size)
    return out


def write_forecast(forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path) -> list[Path]:
    s = inputs.subject
    affine = np.asarray(inputs.meta["affine"], dtype=np.float64)
    full, offset = inputs.meta["full_shape"], inputs.meta["crop_offset"]
    paths = []
    if forecast.outputs.get("celldensity") is not None:
        p = Path(out_dir) / f"sub-{s}_model-{family}_desc-celldensity.nii.gz"
        save_volume(p, voxel.uncrop(np.asarray(forecast.outputs["celldensity"], np.float32), offset, full), affine)
        paths.append(p)
    for key, desc in (("t1gd", "T1Gd"), ("flair", "FLAIR")):
        p = Path(out_dir) / f"sub-{s}_model-{family}_desc-{desc}_mask.nii.gz"
        save_volume(p, voxel.uncrop(np.asarray(forecast.outputs[key]).astype(np.uint8), offset, full), affine)
        paths.append(p)
    return paths
