"""Template-space grid handling shared by the voxel-wise disorders (glioma, stroke).

Every subject's model inputs live on the same `res-model` template grid, cropped to one fixed box
around the template brain, so cross-subject networks see arrays of one shape and forecasts can be
written back onto the full grid from the offset stored in the inputs' json.

Also here: ``VoxelDisorder``, the ``Disorder`` both are instances of; reading their preprocessed
volumes (``GridReader``, ``preproc_*`` paths) and sessions tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurohybrid.disorders.base import Disorder, Forecast, SubjectData
from neurohybrid.errors import InputError
from neurohybrid.io import check_same_grid, load_volume
from neurohybrid.io.tsv import read_table

SPACE = "MNI152NLin2009cSym"


class VoxelDisorder(Disorder):
    """A voxel-wise disorder whose ``<package>.families`` (FAMILIES) and ``<package>.inputs``
    (build_inputs, write_forecast) modules are imported on first use: torch is only needed once a
    family is used."""

    package: str = ""  # e.g. "neurohybrid.disorders.glioma"

    def _module(self, name: str):
        import importlib

        return importlib.import_module(f"{self.package}.{name}")

    @property
    def families(self):
        return self._module("families").FAMILIES

    def build_inputs(self, subject: str, bids_dir: Path, preproc_dir: Path, config: dict) -> tuple[SubjectData, SubjectData]:
        return self._module("inputs").build_inputs(subject, Path(bids_dir), Path(preproc_dir), config or {})

    def write_forecast(self, forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path):
        return self._module("inputs").write_forecast(forecast, inputs, family, Path(out_dir))


def voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def template_box(shape, affine, margin: int = 2) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(offset, size) of the crop box: the template brain's bounding box plus `margin` voxels.

    The box depends only on the grid, so it is the same for every subject. When the grid is not the
    template's res-model grid (other field of view, e.g. small synthetic test grids) there is no
    template brain to crop to and the whole grid is kept.
    """
    shape = tuple(int(s) for s in shape)
    vox = voxel_size(affine)
    if max(vox) - min(vox) < 1e-3:
        brain = None
        try:
            import importlib.util

            import nibabel as nib

            from neurohybrid.anatomy.active import active_path
            from neurohybrid.anatomy.templates import _FILES, load_template

            # the res-model grid has ceil(1 mm shape / voxel) voxels: check that from the run's
            # template header (resources manifest, else the shipped file, found without importing
            # nilearn, which takes seconds) before paying for a resampled template
            path = active_path("template_gm")
            if path is None:
                spec = importlib.util.find_spec("nilearn")
                path = Path(spec.origin).parent / "datasets" / "data" / _FILES["gm"]
            full = np.array(nib.load(str(path)).shape)
            if tuple(int(v) for v in np.ceil(full / vox[0])) == shape:
                brain = load_template("brain", round(vox[0], 4))
        except Exception:  # template unavailable: keep the whole grid rather than guess a box
            brain = None
        if brain is not None and tuple(brain.shape) == shape and np.allclose(brain.affine, affine, atol=1e-3):
            idx = np.argwhere(np.asarray(brain.dataobj) > 0)
            lo = np.maximum(idx.min(axis=0) - margin, 0)
            hi = np.minimum(idx.max(axis=0) + 1 + margin, shape)
            return tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo)
    return (0, 0, 0), shape


def crop(arr: np.ndarray, offset, size) -> np.ndarray:
    sl = tuple(slice(o, o + s) for o, s in zip(offset, size))
    return np.ascontiguousarray(arr[(...,) + sl])


def uncrop(arr: np.ndarray, offset, full_shape, fill=0) -> np.ndarray:
    out = np.full(tuple(full_shape), fill, dtype=arr.dtype)
    sl = tuple(slice(o, o + s) for o, s in zip(offset, arr.shape))
    out[sl] = arr
    return out


def preproc_anat(preproc: Path, subject: str, label: str) -> Path:
    return preproc / f"sub-{subject}" / "anat" / f"sub-{subject}_space-{SPACE}_res-model_label-{label}_probseg.nii.gz"


def preproc_mask(preproc: Path, subject: str, session: str, desc: str) -> Path:
    return (preproc / f"sub-{subject}" / f"ses-{session}" / "anat"
            / f"sub-{subject}_ses-{session}_space-{SPACE}_res-model_desc-{desc}_mask.nii.gz")


def preproc_cbf(preproc: Path, subject: str, session: str) -> Path:
    return (preproc / f"sub-{subject}" / f"ses-{session}" / "perf"
            / f"sub-{subject}_ses-{session}_space-{SPACE}_res-model_cbf.nii.gz")


def require_raw(derived: Path, raw: Path, subject: str) -> Path:
    """A res-model volume made from a user's raw file: when neither exists, the error names the raw
    file (the one the user must provide), not the derived one."""
    if not Path(derived).exists() and not Path(raw).exists():
        raise InputError("raw file not found (needed by this disorder's model)", file=raw, subject=subject)
    return derived


class GridReader:
    """Loads a subject's res-model volumes, checking they all share the first one's grid."""

    def __init__(self, subject: str):
        self.subject = subject
        self.reference = None

    def load(self, path: Path, *, value_range=None, binary=False) -> np.ndarray:
        data, affine = load_volume(path, subject=self.subject, value_range=value_range)
        if self.reference is None:
            self.reference = (str(path), data, affine)
        else:
            check_same_grid(self.reference, (str(path), data, affine), subject=self.subject)
        if binary:
            values = np.unique(data)
            if not np.all(np.isin(values, (0.0, 1.0))):
                raise InputError(f"mask must hold only 0 and 1, found values {values[:5].tolist()}...", file=path, subject=self.subject)
            return data > 0.5
        return data

    @property
    def affine(self) -> np.ndarray:
        return self.reference[2]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.reference[1].shape)


def read_sessions(bids: Path, subject: str, time_column: str) -> list[tuple[str, float]]:
    """(session label, time) sorted by time, from <bids>/sub-S/sub-S_sessions.tsv (which must list
    exactly the subject's session folders)."""
    from neurohybrid.preprocessing.layout import check_sessions_on_disk

    path = bids / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    table = read_table(path, subject=subject, required=["session_id", time_column])
    check_sessions_on_disk(bids, subject, [str(s).removeprefix("ses-") for s in table["session_id"]], path,
                           need_folders=False)
    rows = []
    for sid, t in zip(table["session_id"], table[time_column]):
        try:
            t = float(t)
        except (TypeError, ValueError):
            t = float("nan")
        if not np.isfinite(t):
            raise InputError(f"session {sid} has no valid {time_column}", file=path, subject=subject)
        rows.append((str(sid).removeprefix("ses-"), t))
    rows.sort(key=lambda r: r[1])
    if len({r[1] for r in rows}) != len(rows):
        raise InputError(f"two sessions share the same {time_column}", file=path, subject=subject)
    return rows


def tumour_box(masks: list[np.ndarray], shape, margin: int) -> tuple[slice, slice, slice]:
    """Box around the union of masks, enlarged by `margin` voxels (clipped to the grid)."""
    union = np.zeros(shape, bool)
    for m in masks:
        union |= m
    if not union.any():
        return tuple(slice(0, s) for s in shape)
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def optional_float(value):
    """None stays None (e.g. no training time limit: the default, so results do not depend on machine load)."""
    return None if value is None else float(value)
