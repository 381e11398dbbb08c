"""Synthetic subjects: the MNI template pushed through a known smooth random warp.

Until the demo generator's ground truth is used, this gives tests an exact answer: the true
template->subject mapping, hence true tissue maps and true DK labels on the subject grid.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from neurohybrid.anatomy.atlas import load_dk_atlas
from neurohybrid.anatomy.templates import load_template


def smooth_displacement(shape, voxel_mm, amplitude_mm, smooth_mm, rng):
    """A smooth random displacement field (3, *shape) in voxels, peak amplitude ~amplitude_mm."""
    disp = []
    for _ in range(3):
        f = ndimage.gaussian_filter(rng.standard_normal(shape), smooth_mm / voxel_mm)
        f *= amplitude_mm / voxel_mm / max(np.abs(f).max(), 1e-12)
        disp.append(f)
    return np.stack(disp)


def make_subject(root: Path, subject="01", session="1", *, voxel_mm=2.0, amplitude_mm=4.0, seed=0,
                 bias=0.25, lesion_center_mm=None, lesion_radius_mm=12.0):
    """Write a raw BIDS subject (T1w, optional lesion mask) and return the ground truth.

    Subject grid = template grid at voxel_mm with an extra affine (small rotation, scaling, shift),
    then a smooth nonlinear displacement. A lesion, if asked, is a dark sphere in subject space.
    """
    rng = np.random.default_rng(seed)
    t1 = load_template("t1", voxel_mm)
    gm = load_template("gm", voxel_mm).get_fdata()
    wm = load_template("wm", voxel_mm).get_fdata()
    csf = load_template("csf", voxel_mm).get_fdata()
    dk, _ = load_dk_atlas(voxel_mm)
    shape = t1.shape
    grid = np.indices(shape).astype(np.float64)
    # subject voxel -> template voxel: small affine about the centre + smooth displacement
    ang = np.deg2rad(4.0)
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]]) * 1.04
    centre = (np.array(shape) - 1) / 2
    coords = np.tensordot(rot, grid - centre[:, None, None, None], axes=1) + centre[:, None, None, None]
    coords += np.array([1.0, -1.5, 0.5])[:, None, None, None]
    coords += smooth_displacement(shape, voxel_mm, amplitude_mm, 20.0, rng)

    def warp(data, order):
        return ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0.0)

    t1_s = warp(t1.get_fdata(), 1)
    field = np.exp(bias * ndimage.gaussian_filter(rng.standard_normal(shape), 15.0 / voxel_mm) * 8)
    truth = {
        "gm": warp(gm, 1), "wm": warp(wm, 1), "csf": warp(csf, 1),
        "dk": warp(np.asarray(dk.dataobj), 0).astype(np.int16),
    }
    lesion = None
    if lesion_center_mm is not None:
        world = nib.affines.apply_affine(t1.affine, np.moveaxis(grid, 0, -1))
        lesion = np.linalg.norm(world - np.asarray(lesion_center_mm), axis=-1) <= lesion_radius_mm
        t1_s = np.where(lesion, 0.35 * t1_s.max(), t1_s)  # a bright, featureless mass
    t1_s = t1_s * field + rng.normal(0, 0.01 * t1_s.max(), shape).clip(0) * (t1_s > 0)
    sub = f"sub-{subject}"
    anat = root / sub / f"ses-{session}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(t1_s.astype(np.float32), t1.affine), anat / f"{sub}_ses-{session}_T1w.nii.gz")
    if lesion is not None:
        les = root / "derivatives" / "lesions" / sub / f"ses-{session}" / "anat"
        les.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), t1.affine),
                 les / f"{sub}_ses-{session}_space-T1w_desc-T1Gd_mask.nii.gz")
        truth["lesion"] = lesion
    (root / "dataset_description.json").write_text('{"Name": "synthetic", "BIDSVersion": "1.8.0"}')
    truth["affine"] = t1.affine
    return truth


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s
