"""Parcellation products: regional volumes, PET reference region and regional SUVR.

The DK atlas has no cerebellum, so the PET reference region (cerebellar grey matter) is defined in
template space: template GM > 0.5 inside a posterior-inferior box (MNI mm: |x| <= 60,
-100 <= y <= -40, -70 <= z <= -15) and outside every DK label (the box also holds brainstem,
occipital and inferior temporal cortex, which DK labels). It is warped to each subject with the
inverse transforms like the DK labels.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd

from neurohybrid.errors import InputError

CEREBELLUM_BOX_MM = {"x": (-60.0, 60.0), "y": (-100.0, -40.0), "z": (-70.0, -15.0)}


def cerebellum_gm_template(gm: nib.Nifti1Image, dk: nib.Nifti1Image) -> np.ndarray:
    """Boolean cerebellar-GM mask on the template grid of ``gm`` (``dk`` on the same grid)."""
    ijk = np.indices(gm.shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(gm.affine, ijk).T.reshape((3,) + gm.shape)
    box = np.ones(gm.shape, bool)
    for axis, (lo, hi) in zip(xyz, CEREBELLUM_BOX_MM.values()):
        box &= (axis >= lo) & (axis <= hi)
    return box & (gm.get_fdata() > 0.5) & (np.asarray(dk.dataobj) == 0)


def regional_volumes(dseg: np.ndarray, voxel_volume_mm3: float, regions: pd.DataFrame) -> pd.DataFrame:
    """(region, volume_mm3) for every atlas region, 0 for a region absent from the subject."""
    counts = np.bincount(dseg.ravel().astype(np.int64), minlength=int(regions["id"].max()) + 1)
    return pd.DataFrame({"region": regions["name"].to_numpy(),
                         "volume_mm3": counts[regions["id"].to_numpy()] * float(voxel_volume_mm3)})


def regional_suvr(pet: np.ndarray, dseg: np.ndarray, reference: np.ndarray, regions: pd.DataFrame, *,
                  subject=None, file=None) -> pd.DataFrame:
    """(region, suvr): mean uptake per region divided by mean uptake in the reference region.

    A region absent from the subject gets n/a (NaN), so a missing value is never mistaken for 0.
    """
    ref = reference > 0
    if ref.sum() == 0:
        raise InputError("reference region (cerebellar grey matter) is empty", subject=subject, file=file)
    ref_mean = float(pet[ref].mean())
    if not np.isfinite(ref_mean) or ref_mean <= 0:
        raise InputError(f"mean uptake in the reference region is {ref_mean:.4g}, not positive",
                         subject=subject, file=file)
    labels = dseg.ravel().astype(np.int64)
    n = int(max(labels.max(), regions["id"].max())) + 1
    sums = np.bincount(labels, weights=pet.ravel().astype(np.float64), minlength=n)
    counts = np.bincount(labels, minlength=n)
    ids = regions["id"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[ids] > 0, sums[ids] / np.maximum(counts[ids], 1), np.nan)
    return pd.DataFrame({"region": regions["name"].to_numpy(), "suvr": means / ref_mean})
