"""MNI152 2009c (symmetric, nonlinear) T1, GM and WM maps from the nilearn wheel.

nilearn ships them at 1 mm (197 x 233 x 189). We read the files directly rather than through
``nilearn.datasets.load_mni152_*`` because those helpers resample and cache; here we want the
exact shipped grid, and a resampled copy at a chosen voxel size, reproducibly.
"""

from __future__ import annotations

import functools
from importlib import resources

import nibabel as nib
import numpy as np

TEMPLATE_SPACE = "MNI152NLin2009cSym"
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def template_path(kind: str):
    """Path of the run's 1 mm template file (kind 't1', 'gm' or 'wm'): the active resources
    manifest's (neurohybrid.anatomy.resources), else the file shipped in nilearn's wheel."""
    from neurohybrid.anatomy.active import active_path

    chosen = active_path(f"template_{kind}")
    if chosen is not None:
        return chosen
    return resources.files("nilearn.datasets") / "data" / _FILES[kind]


def load_template(kind: str, voxel_mm: float = 1.0) -> nib.Nifti1Image:
    """The template image at an isotropic voxel size (linear interpolation, same field of view).

    GM/WM are probabilities in [0, 1]; T1 is intensity. A 'brain' kind gives the mask
    GM + WM > 0.5 dilated by one voxel, and 'csf' the remaining probability inside that mask
    (nilearn ships no CSF map).
    """
    # cached by the files read, so activating another resources manifest is never served stale
    paths = tuple(str(template_path(k)) for k in ("t1", "gm", "wm"))
    return _load_template(paths, kind, float(voxel_mm))


@functools.lru_cache(maxsize=16)
def _load_template(paths: tuple[str, str, str], kind: str, voxel_mm: float) -> nib.Nifti1Image:
    if kind in ("brain", "csf"):
        gm = _load_template(paths, "gm", voxel_mm)
        wm = _load_template(paths, "wm", voxel_mm)
        gmd, wmd = gm.get_fdata(), wm.get_fdata()
        from scipy import ndimage

        brain = ndimage.binary_dilation(gmd + wmd > 0.5, iterations=1)
        if kind == "brain":
            return nib.Nifti1Image(brain.astype(np.uint8), gm.affine)
        csf = np.where(brain, np.clip(1.0 - gmd - wmd, 0.0, 1.0), 0.0)
        return nib.Nifti1Image(csf.astype(np.float32), gm.affine)
    img = nib.load(paths[("t1", "gm", "wm").index(kind)])
    if kind in ("gm", "wm"):
        from neurohybrid.anatomy.tables import template_probability

        # nilearn ships the probability maps as uint8 0..255 (no scl_slope); a user's may be float
        data = template_probability(img, file=img.get_filename())
    else:
        data = np.asarray(img.get_fdata(), dtype=np.float32)
    img = nib.Nifti1Image(data, img.affine)
    if abs(voxel_mm - 1.0) < 1e-9:
        return img
    from nilearn.image import resample_img

    target = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    target[:3, 3] = img.affine[:3, 3]
    shape = np.ceil(np.array(img.shape) / voxel_mm).astype(int)
    out = resample_img(img, target_affine=target, target_shape=tuple(shape), interpolation="linear",
                       force_resample=True, copy_header=True)
    data = np.asarray(out.get_fdata(), dtype=np.float32)
    if kind in ("gm", "wm"):
        data = np.clip(data, 0.0, 1.0)
    return nib.Nifti1Image(data, out.affine)


def registration_voxel_mm(img) -> float:
    """Template resolution used as the registration target for a subject image (nibabel): the
    subject's voxel size, in [1, 4] mm, in 0.5 mm steps (shared by the ANTs and FSL backends)."""
    vox = float(np.mean(nib.affines.voxel_sizes(img.affine)))
    return float(np.clip(np.round(vox * 2) / 2, 1.0, 4.0))
