"""Re-shape a co-registered BIDS cohort the way scanners deliver it (issue 13).

- every later session is moved by a rigid pose change (a few degrees and millimetres): the head
  moved in the scanner, so every image and mask of that session has its world coordinates
  changed by the same rigid map (applied to the affine: the voxel data stay exact);
- FLAIR, PET and CBF are resampled onto their own anisotropic, oblique grid in LPS orientation
  (voxel v x v x 2v for demo voxel v, 4 degrees oblique, a field of view padded by 2 voxels);
  a FLAIR lesion mask follows its FLAIR (linear + 0.5) and is renamed ``space-FLAIR``;
- every T1w is stored as int16 with a scale factor (scl_slope 0.0371);
- sessions without images (a stroke follow-up's final infarct) stay on the reference T1w.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def rotation(deg_xyz) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose(deg_xyz, mm_xyz, centre) -> np.ndarray:
    """World (RAS) rigid map: rotation about `centre`, then translation."""
    m = np.eye(4)
    r = rotation(deg_xyz)
    m[:3, :3] = r
    m[:3, 3] = np.asarray(mm_xyz) + np.asarray(centre) - r @ np.asarray(centre)
    return m


def lps_oblique_grid(img: nib.Nifti1Image, voxel, deg=4.0, pad=2) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid covering img's field of view: LPS axes tilted `deg` about x, given voxel sizes."""
    shape = np.asarray(img.shape[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = nib.affines.apply_affine(img.affine, corners)
    axes = np.diag([-1.0, -1.0, 1.0]) @ rotation((deg, 0, 0))  # columns: L, P, S directions, tilted
    local = world @ axes  # coordinates along the new axes (orthonormal)
    lo, hi = local.min(0), local.max(0)
    voxel = np.asarray(voxel, float)
    new_shape = tuple(int(v) for v in np.ceil((hi - lo) / voxel) + 1 + 2 * pad)
    aff = np.eye(4)
    aff[:3, :3] = axes * voxel
    aff[:3, 3] = axes @ (lo - pad * voxel)
    return new_shape, aff


def resample(data: np.ndarray, src_aff, shape, dst_aff, *, order=1) -> np.ndarray:
    """data (on src_aff) sampled at the voxels of (shape, dst_aff), same world."""
    m = np.linalg.inv(src_aff) @ dst_aff
    return ndimage.affine_transform(data.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=order,
                                    mode="constant", cval=0.0)


def save(path: Path, data, affine, *, scaled_int16=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if scaled_int16:
        img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
        img.set_data_dtype(np.int16)
        img.header.set_slope_inter(0.0371, 0.0)
    else:
        img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


POSES = [((0, 0, 0), (0, 0, 0)), ((4, -3, 2), (3, -4, 2.5)), ((-3, 2, 4), (-2.5, 3, -3)), ((2, 4, -3), (4, 2, -2))]


def reshape_bids(src: Path, dst: Path, subjects: list[str]) -> dict:
    """Copy `subjects` of BIDS `src` to `dst`, re-shaped (module docstring). Returns the poses used."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("dataset_description.json", "participants.tsv", "participants.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    if (src / "derivatives" / "lesions" / "dataset_description.json").exists():
        (dst / "derivatives" / "lesions").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "derivatives" / "lesions" / "dataset_description.json",
                    dst / "derivatives" / "lesions" / "dataset_description.json")
    used = {}
    for sub in subjects:
        base = src / f"sub-{sub}"
        shutil.copytree(base, dst / f"sub-{sub}", ignore=shutil.ignore_patterns("*.nii.gz"))
        les_root = src / "derivatives" / "lesions" / f"sub-{sub}"
        raw = sorted(p.name for p in base.glob("ses-*") if p.is_dir())
        sessions = sorted(set(raw) | {p.name for p in les_root.glob("ses-*") if p.is_dir()})
        ref = nib.load(str(next(base.glob(f"{raw[0]}/anat/*_T1w.nii.gz"))))
        centre = nib.affines.apply_affine(ref.affine, (np.asarray(ref.shape) - 1) / 2)
        for i, ses in enumerate(sessions):
            # a session without images of its own is on the reference T1w: nothing to move it with
            p = pose(*POSES[i % len(POSES)], centre) if i and ses in raw else np.eye(4)
            used[f"{sub}/{ses}"] = p
            grids = {}
            for path in sorted((base / ses).rglob("*.nii.gz")):
                out = dst / path.relative_to(src)
                img = nib.load(str(path))
                data = np.asarray(img.dataobj, np.float32)
                suffix = path.name.removesuffix(".nii.gz").rsplit("_", 1)[1]
                if suffix in ("FLAIR", "pet", "cbf"):
                    v = float(np.mean(nib.affines.voxel_sizes(img.affine)))
                    shape, aff = lps_oblique_grid(img, (v, v, 2 * v))
                    data = resample(data, img.affine, shape, aff)
                    grids[suffix] = (shape, aff, img.affine)
                    save(out, data, p @ aff)
                elif suffix == "T1w":
                    save(out, data, p @ img.affine, scaled_int16=True)
                else:  # DWI (4D) and anything else: pose only
                    out.parent.mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(data, p @ img.affine, img.header), str(out))
            for path in sorted((les_root / ses).rglob("*.nii.gz")) if les_root.is_dir() else []:
                img = nib.load(str(path))
                data = np.asarray(img.dataobj, np.float32)
                out = dst / path.relative_to(src)
                if "desc-FLAIR" in path.name and "FLAIR" in grids:
                    shape, aff, src_aff = grids["FLAIR"]
                    data = resample(data, src_aff, shape, aff) >= 0.5
                    out = out.with_name(out.name.replace("space-T1w", "space-FLAIR"))
                    save(out, data.astype(np.float32), p @ aff)
                else:
                    save(out, data, p @ img.affine)
    return used
