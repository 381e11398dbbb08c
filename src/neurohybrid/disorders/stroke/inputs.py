"""Stroke model inputs and targets, and writing forecasts back onto the res-model grid.

Inputs (``sub-S_desc-modelinputs.npz``): ``cbf`` (ml/100 ml/min), ``wm``, ``gm`` (float32) and ``core``
(bool, the acute infarct core), all cropped to the template box. Sidecar: ``hours_acute``,
``hours_followup`` (when to forecast; the follow-up images are never read here), ``reperfusion_h``
(onset to reperfusion, null = never), ``affine``, ``full_shape``, ``crop_offset``, ``voxel_mm``.
Target (``sub-S_desc-target.npz``): ``infarct`` (bool, full res-model grid); sidecar ``affine``,
``voxel_mm``, ``hours_since_onset``, ``session``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from neurohybrid.disorders.base import Forecast, SubjectData
from neurohybrid.disorders import voxel
from neurohybrid.errors import InputError
from neurohybrid.settings import resolve
from neurohybrid.io import save_volume
from neurohybrid.io.tsv import read_table
from neurohybrid.preprocessing.layout import raw_cbf, raw_lesion


def _reperfusion(bids: Path, subject: str) -> float | None:
    path = bids / "participants.tsv"
    table = read_table(path, subject=subject, required=["participant_id"])
    rows = table[table["participant_id"].astype(str).isin([f"sub-{subject}", subject])]
    if rows.empty:
        raise InputError("subject not listed in participants.tsv", file=path, subject=subject)
    if "onset_to_reperfusion_h" not in table.columns:
        return None
    value = rows.iloc[0]["onset_to_reperfusion_h"]
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"onset_to_reperfusion_h must be a number of hours or n/a, got {value!r}", file=path, subject=subject) from None
    if math.isnan(value):
        return None
    if value < 0 or not math.isfinite(value):
        raise InputError(f"onset_to_reperfusion_h must be >= 0 h, got {value}", file=path, subject=subject)
    return value


def build_inputs(subject: str, bids: Path, preproc: Path, config: dict) -> tuple[SubjectData, SubjectData]:
    sessions = dict(voxel.read_sessions(bids, subject, "hours_since_onset"))
    table = bids / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    for needed in ("acute", "followup"):
        if needed not in sessions:
            raise InputError(f"stroke needs sessions 'acute' and 'followup', found {sorted(sessions)}", file=table, subject=subject)
    t_acute, t_follow = sessions["acute"], sessions["followup"]
    if not (0 < t_acute < t_follow):
        raise InputError(f"need 0 < hours_since_onset(acute) < hours_since_onset(followup), got {t_acute}, {t_follow}",
                         file=table, subject=subject)
    reperfusion = _reperfusion(bids, subject)
    reader = voxel.GridReader(subject)
    cbf_path = voxel.require_raw(voxel.preproc_cbf(preproc, subject, "acute"), raw_cbf(bids, subject, "acute"), subject)
    cbf = reader.load(cbf_path)
    if cbf.min() < 0 or cbf.max() > 300:
        raise InputError(f"CBF must lie in [0, 300] ml/100 ml/min, found [{cbf.min():.3g}, {cbf.max():.3g}]", file=cbf_path, subject=subject)
    gm = reader.load(voxel.preproc_anat(preproc, subject, "GM"), value_range=(0.0, 1.0))
    wm = reader.load(voxel.preproc_anat(preproc, subject, "WM"), value_range=(0.0, 1.0))
    core, final = (reader.load(voxel.require_raw(voxel.preproc_mask(preproc, subject, ses, "infarct"),
                                                 raw_lesion(bids, subject, ses, "infarct"), subject), binary=True)
                   for ses in ("acute", "followup"))
    margin = int(resolve(config, "stroke")["crop_margin"])
    offset, size = voxel.template_box(reader.shape, reader.affine, margin=margin)
    vox = voxel.voxel_size(reader.affine)
    affine = np.asarray(reader.affine).tolist()
    meta = dict(sessions=["acute"], target_session="followup", hours_acute=t_acute, hours_followup=t_follow,
                reperfusion_h=reperfusion, affine=affine, full_shape=list(reader.shape), crop_offset=list(offset),
                voxel_mm=list(vox))
    arrays = dict(cbf=voxel.crop(cbf, offset, size).astype(np.float32), wm=voxel.crop(wm, offset, size).astype(np.float32),
                  gm=voxel.crop(gm, offset, size).astype(np.float32), core=voxel.crop(core, offset, size))
    target = SubjectData(subject, "stroke", dict(infarct=final),
                         dict(affine=affine, voxel_mm=list(vox), hours_since_onset=t_follow, session="followup"))
    return SubjectData(subject, "stroke", arrays, meta), target


def cropped_target(inputs: SubjectData, target: SubjectData) -> np.ndarray:
    arr = np.asarray(target.arrays["infarct"]).astype(bool)
    if list(arr.shape) != list(inputs.meta["full_shape"]):
        raise InputError(f"target infarct has shape {arr.shape}, inputs grid {inputs.meta['full_shape']}", subject=target.subject)
    return voxel.crop(arr, inputs.meta["crop_offset"], inputs.arrays["cbf"].shape)


def write_forecast(forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path) -> list[Path]:
    s = inputs.subject
    affine = np.asarray(inputs.meta["affine"], dtype=np.float64)
    full, offset = inputs.meta["full_shape"], inputs.meta["crop_offset"]
    infarct = np.asarray(forecast.outputs["infarct"]).astype(bool)
    dead = forecast.outputs.get("dead")
    if dead is None:  # families without a dead fraction: the mask is their probability
        dead = infarct.astype(np.float32)
    p_mask = Path(out_dir) / f"sub-{s}_model-{family}_desc-infarct_mask.nii.gz"
    p_dead = Path(out_dir) / f"sub-{s}_model-{family}_desc-dead_probseg.nii.gz"
    save_volume(p_mask, voxel.uncrop(infarct.astype(np.uint8), offset, full), affine)
    save_volume(p_dead, voxel.uncrop(np.clip(np.asarray(dead, np.float32), 0, 1), offset, full), affine)
    return [p_mask, p_dead]
