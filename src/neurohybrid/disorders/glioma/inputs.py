"""Glioma model inputs and targets, and writing forecasts back onto the res-model grid.

Inputs (``sub-S_desc-modelinputs.npz``): ``wm``, ``gm`` (float32, cropped to the template box),
``t1gd``, ``flair`` (bool, (sessions, X, Y, Z), every session but the last).
Sidecar: ``sessions``, ``days`` (of the input sessions), ``target_session``, ``target_day`` (when to
forecast: the last session's day, its images are never read here), ``affine`` and ``full_shape``
(res-model grid), ``crop_offset``, ``voxel_mm``.
Target (``sub-S_desc-target.npz``): ``t1gd``, ``flair`` (bool, full res-model grid); sidecar
``affine``, ``voxel_mm``, ``day``, ``session``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurohybrid.disorders.base import Forecast, SubjectData
from neurohybrid.disorders import voxel
from neurohybrid.errors import InputError
from neurohybrid.io import save_volume


def build_inputs(subject: str, bids: Path, preproc: Path, config: dict) -> tuple[SubjectData, SubjectData]:
    sessions = voxel.read_sessions(bids, subject, "day")
    if len(sessions) < 2:
        raise InputError(f"glioma needs at least 2 sessions (earlier ones to fit, the last to forecast), found {len(sessions)}",
                         file=bids / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", subject=subject)
    reader = voxel.GridReader(subject)
    gm = reader.load(voxel.preproc_anat(preproc, subject, "GM"), value_range=(0.0, 1.0))
    wm = reader.load(voxel.preproc_anat(preproc, subject, "WM"), value_range=(0.0, 1.0))
    masks = {"T1Gd": [], "FLAIR": []}
    for ses, _ in sessions:
        for desc in masks:
            masks[desc].append(reader.load(voxel.preproc_mask(preproc, subject, ses, desc), binary=True))
    first = voxel.preproc_mask(preproc, subject, sessions[0][0], "FLAIR")
    if not masks["FLAIR"][0].any() and not masks["T1Gd"][0].any():
        raise InputError("the first session's tumour masks are empty: nothing to seed the model from", file=first, subject=subject)
    offset, size = voxel.template_box(reader.shape, reader.affine, margin=int(voxel.settings(config, "glioma", {"crop_margin": 3}, {})["crop_margin"]))
    vox = voxel.voxel_size(reader.affine)
    meta = dict(
        sessions=[s for s, _ in sessions[:-1]], days=[d for _, d in sessions[:-1]],
        target_session=sessions[-1][0], target_day=sessions[-1][1],
        affine=np.asarray(reader.affine).tolist(), full_shape=list(reader.shape), crop_offset=list(offset),
        voxel_mm=list(vox),
    )
    arrays = dict(
        wm=voxel.crop(wm, offset, size).astype(np.float32), gm=voxel.crop(gm, offset, size).astype(np.float32),
        t1gd=voxel.crop(np.stack(masks["T1Gd"][:-1]), offset, size), flair=voxel.crop(np.stack(masks["FLAIR"][:-1]), offset, size),
    )
    inputs = SubjectData(subject, "glioma", arrays, meta)
    target = SubjectData(subject, "glioma", dict(t1gd=masks["T1Gd"][-1], flair=masks["FLAIR"][-1]),
                         dict(affine=meta["affine"], voxel_mm=list(vox), day=sessions[-1][1], session=sessions[-1][0]))
    return inputs, target


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
