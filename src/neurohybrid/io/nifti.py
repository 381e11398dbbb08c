"""Validated NIfTI input and atomic NIfTI output (nibabel underneath)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from neurohybrid.errors import InputError
from neurohybrid.io.atomic import atomic_path


def load_image(path: str | Path, *, subject: str | None = None, ndim: int | None = 3) -> nib.Nifti1Image:
    """Load a NIfTI image and check what every consumer relies on.

    Raises InputError (naming subject and file) for a missing or unreadable file, a wrong
    number of dimensions, a non-finite or singular affine, or non-finite voxel values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path, subject=subject)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", file=path, subject=subject) from None
    if ndim is not None:
        shape = data.shape
        # a trailing singleton dimension (x, y, z, 1) is a 3D image in practice
        while len(shape) > ndim and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != ndim:
            raise InputError(f"expected a {ndim}D image, got shape {data.shape}", file=path, subject=subject)
        if shape != data.shape:
            img = nib.Nifti1Image(data.reshape(shape), img.affine, img.header)
            data = np.asanyarray(img.dataobj)
    _check_voxel_size_defined(img, path, subject)
    affine = img.affine
    if not np.all(np.isfinite(affine)):
        raise InputError("affine contains NaN or infinite values", file=path, subject=subject)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError("affine is singular (zero voxel size or collapsed axes)", file=path, subject=subject)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InputError("image contains NaN or infinite voxel values", file=path, subject=subject)
    return img


def _check_voxel_size_defined(img, path: Path, subject) -> None:
    """Without a qform or sform the voxel size comes from pixdim alone, and nibabel silently turns a
    zero pixdim into 1 mm on load: read the stored header unfixed and refuse that case."""
    header = img.header
    if not isinstance(header, nib.Nifti1Header) or header["qform_code"] > 0 or header["sform_code"] > 0:
        return
    with nib.openers.ImageOpener(str(path)) as fobj:
        raw = type(header).from_fileobj(fobj, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(f"voxel size undefined: pixdim {pixdim.tolist()} and no qform or sform", file=path, subject=subject)


def load_volume(
    path: str | Path,
    *,
    subject: str | None = None,
    value_range: tuple[float, float] | None = None,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D image as (array, affine); optionally check every value lies in value_range."""
    img = load_image(path, subject=subject, ndim=3)
    data = np.asarray(img.get_fdata(dtype=np.float64), dtype=dtype)
    if value_range is not None:
        lo, hi = value_range
        tol = 1e-6 * max(1.0, abs(hi - lo))
        vmin, vmax = float(data.min()), float(data.max())
        if vmin < lo - tol or vmax > hi + tol:
            raise InputError(
                f"values must lie in [{lo}, {hi}], found [{vmin:.4g}, {vmax:.4g}]", file=path, subject=subject
            )
    return data, img.affine


def check_same_grid(reference: tuple[str, np.ndarray, np.ndarray], other: tuple[str, np.ndarray, np.ndarray], *, subject=None):
    """Raise InputError unless two (path, data, affine) triples share shape and affine."""
    ref_path, ref_data, ref_aff = reference
    path, data, aff = other
    if data.shape != ref_data.shape:
        raise InputError(f"shape {data.shape} differs from {Path(ref_path).name} {ref_data.shape}", file=path, subject=subject)
    if not np.allclose(aff, ref_aff, atol=1e-3):
        raise InputError(f"affine differs from that of {Path(ref_path).name}", file=path, subject=subject)


def set_units(img) -> None:
    """Spatial units mm and time units s in the header (BIDS validators warn, NIFTI_UNIT, when unset)."""
    img.header.set_xyzt_units(xyz="mm", t="sec")


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, *, dtype=None, header=None) -> None:
    """Write a 3D array as NIfTI atomically (temporary file, then rename)."""
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == np.float64:
        data = data.astype(np.float32)  # float32 is ample for probabilities and maps, and halves the size
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, affine, header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    set_units(img)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
