"""Reading the held-out target (last session) of a subject, written by `neurohybrid inputs`.

Layout (docs/architecture.md, "Targets format"):
``<targets>/sub-<id>/sub-<id>_desc-target.npz`` with arrays, and ``sub-<id>_desc-target.json``
with metadata. Tolerant where it costs nothing (a ``sub-`` prefix or not, masks stored as 0/1
integers), strict everywhere else: a missing key, a wrong shape or non-finite values raise
InputError naming subject and file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurohybrid.errors import InputError

from neurohybrid.disorders import DISORDERS

# arrays in the npz and keys in the json that each disorder's target must carry
NPZ_KEYS = {"glioma": ("t1gd", "flair"), "alzheimer": ("suvr",), "stroke": ("infarct",)}
JSON_KEYS = {"glioma": ("affine", "voxel_mm", "day"), "alzheimer": ("regions", "years"), "stroke": ("voxel_mm",)}


def bare_subject(subject: str) -> str:
    """'sub-01' and '01' both name subject '01'."""
    return subject[4:] if subject.startswith("sub-") else subject


def target_paths(targets_root: str | Path, subject: str) -> tuple[Path, Path]:
    sub = bare_subject(subject)
    folder = Path(targets_root) / f"sub-{sub}"
    return folder / f"sub-{sub}_desc-target.npz", folder / f"sub-{sub}_desc-target.json"


@dataclass
class Target:
    subject: str
    disorder: str
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    npz_path: Path | None = None
    json_path: Path | None = None

    @property
    def voxel_mm(self) -> np.ndarray | None:
        v = self.meta.get("voxel_mm")
        return None if v is None else np.asarray(v, dtype=float)

    @property
    def affine(self) -> np.ndarray | None:
        a = self.meta.get("affine")
        return None if a is None else np.asarray(a, dtype=float)


def _as_mask(value: np.ndarray, key: str, path: Path, subject: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 3:
        raise InputError(f"target array '{key}' must be 3D, got shape {arr.shape}", file=path, subject=subject)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1))):
        raise InputError(f"target array '{key}' must be a boolean (or 0/1) mask", file=path, subject=subject)
    return arr.astype(bool)


def read_target(targets_root: str | Path, subject: str, disorder: str) -> Target:
    """Load and validate a subject's target for ``disorder``."""
    sub = bare_subject(subject)
    if disorder not in DISORDERS:
        raise InputError(f"unknown disorder '{disorder}' (expected one of {', '.join(DISORDERS)})", subject=sub)
    npz_path, json_path = target_paths(targets_root, sub)
    for path in (npz_path, json_path):
        if not path.exists():
            raise InputError("target file not found", file=path, subject=sub)
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile/ValueError/OSError on corrupt files
        raise InputError(f"cannot read target npz ({type(exc).__name__}: {exc})", file=npz_path, subject=sub) from None
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read target json ({type(exc).__name__}: {exc})", file=json_path, subject=sub) from None
    if not isinstance(meta, dict):
        raise InputError("target json must hold an object", file=json_path, subject=sub)

    missing = [k for k in NPZ_KEYS[disorder] if k not in arrays]
    if missing:
        raise InputError(f"{disorder} target lacks array(s) {', '.join(missing)} (has: {', '.join(sorted(arrays)) or 'none'})",
                         file=npz_path, subject=sub)
    missing = [k for k in JSON_KEYS[disorder] if k not in meta]
    if missing:
        raise InputError(f"{disorder} target metadata lacks key(s) {', '.join(missing)}", file=json_path, subject=sub)

    target = Target(sub, disorder, {}, meta, npz_path, json_path)
    if disorder in ("glioma", "stroke"):
        for key in NPZ_KEYS[disorder]:
            target.arrays[key] = _as_mask(arrays[key], key, npz_path, sub)
        shapes = {target.arrays[k].shape for k in NPZ_KEYS[disorder]}
        if len(shapes) > 1:
            raise InputError(f"target masks have different shapes {sorted(shapes)}", file=npz_path, subject=sub)
        _check_voxel_mm(meta, json_path, sub)
        if "affine" in meta:
            aff = np.asarray(meta["affine"], dtype=float)
            if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
                raise InputError("'affine' must be a finite 4x4 matrix", file=json_path, subject=sub)
    else:
        suvr = np.asarray(arrays["suvr"], dtype=float)
        regions = meta["regions"]
        if suvr.ndim != 1:
            raise InputError(f"'suvr' must be 1D (one value per region), got shape {suvr.shape}", file=npz_path, subject=sub)
        if not np.all(np.isfinite(suvr)):
            raise InputError("'suvr' contains NaN or infinite values", file=npz_path, subject=sub)
        if not isinstance(regions, list) or len(regions) != suvr.size:
            n = len(regions) if isinstance(regions, list) else "not a list"
            raise InputError(f"'regions' ({n}) must list one name per 'suvr' value ({suvr.size})", file=json_path, subject=sub)
        if len(set(regions)) != len(regions):
            raise InputError("'regions' has duplicate names", file=json_path, subject=sub)
        target.arrays["suvr"] = suvr
    return target


def _check_voxel_mm(meta: dict, path: Path, subject: str) -> None:
    try:
        v = np.asarray(meta["voxel_mm"], dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise InputError("'voxel_mm' must be numbers", file=path, subject=subject) from None
    if v.size == 1:
        v = np.repeat(v, 3)
    if v.size != 3 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise InputError(f"'voxel_mm' must be 1 or 3 positive numbers, got {meta['voxel_mm']}", file=path, subject=subject)
    meta["voxel_mm"] = v.tolist()
