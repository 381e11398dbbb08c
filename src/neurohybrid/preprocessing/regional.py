"""Alzheimer's subjects who bring regional SUVR tables instead of PET images (e.g. ADNI exports).

They skip image preprocessing: `neurohybrid preprocess regional` turns their tables into the
derivatives `neurohybrid inputs` reads for an imaged subject (regional SUVR per visit, regional
volumes, connectome), so the model inputs are built the same way from here on.

Tables live in a BIDS derivatives folder of the input dataset, ``<bids>/derivatives/regional``:
  per visit  sub-S/ses-X/pet/sub-S_ses-X_desc-suvr_pet.tsv     columns region, suvr [, volume_mm3]
  or long    sub-S/sub-S_desc-suvr_pet.tsv                      columns session_id (or visit), region,
                                                                suvr [, volume_mm3]
Visits are the sessions of ``<bids>/sub-S/sub-S_sessions.tsv`` (``ses-X`` or ``X``), which gives
their ``years``. Region names are the atlas's (``L_precuneus``), or any names with a mapping
file (TSV, columns ``source``, ``region``: one atlas region per source name; rows whose name the
mapping does not list are ignored, e.g. ADNI's composite and reference regions).
``volume_mm3`` (the subject's regional volumes, from the first visit that has them) is optional;
without it the atlas's own regional volumes on the template are used. The connectome is the
run's normative one (resources/ or config resources.connectome) on every atlas region.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError
from neurohybrid.io import write_tsv
from neurohybrid.io.tsv import read_table
from neurohybrid.preprocessing import layout
from neurohybrid.preprocessing.layout import Derivatives

REGIONAL = Path("derivatives") / "regional"
SESSION_COLUMNS = ("session_id", "visit")


def subject_dir(bids, subject: str) -> Path:
    return Path(bids) / REGIONAL / f"sub-{layout.subject_label(subject)}"


def has_tables(bids, subject: str) -> bool:
    """Whether the subject brings regional tables (any *_desc-suvr_pet.tsv under its folder)."""
    folder = subject_dir(bids, subject)
    return folder.is_dir() and any(folder.rglob("*_desc-suvr_pet.tsv"))


def read_mapping(path) -> dict[str, str]:
    """{source name: atlas region} from a TSV with columns source, region."""
    table = read_table(path, required=["source", "region"])
    sources, regions = table["source"].astype(str).str.strip(), table["region"].astype(str).str.strip()
    repeated = sorted(set(sources[sources.duplicated()]))
    if repeated:
        raise InputError(f"region mapping: source name(s) listed twice: {', '.join(repeated[:5])}", file=path)
    taken = sorted(set(regions[regions.duplicated()]))
    if taken:
        raise InputError(f"region mapping: atlas region(s) mapped from more than one source name: {', '.join(taken[:5])} "
                         "(regional values cannot be merged without their volumes)", file=path)
    return dict(zip(sources, regions))


def _visit_tables(bids: Path, sub: str) -> dict[str, tuple[pd.DataFrame, Path]]:
    """{session label: (rows with region, suvr[, volume_mm3]; the file)} from either layout."""
    folder = subject_dir(bids, sub)
    long_path = folder / f"sub-{sub}_desc-suvr_pet.tsv"
    per_visit = sorted(folder.glob(f"ses-*/pet/sub-{sub}_ses-*_desc-suvr_pet.tsv"))
    if long_path.exists() and per_visit:
        raise InputError("regional tables given twice: a long table and per-visit tables; keep one", file=long_path,
                         subject=sub)
    out = {}
    if long_path.exists():
        table = read_table(long_path, subject=sub, required=["region", "suvr"])
        column = next((c for c in SESSION_COLUMNS if c in table.columns), None)
        if column is None:
            raise InputError("long regional table needs a 'session_id' (or 'visit') column", file=long_path, subject=sub)
        labels = table[column].astype(str).str.strip().str.removeprefix("ses-")
        for ses in dict.fromkeys(labels):
            out[ses] = (table[labels == ses].drop(columns=[column]), long_path)
    for path in per_visit:
        ses = path.parent.parent.name.removeprefix("ses-")
        out[ses] = (read_table(path, subject=sub, required=["region", "suvr"]), path)
    if not out:
        raise InputError("no regional SUVR table (sub-S_desc-suvr_pet.tsv or ses-*/pet/sub-S_ses-*_desc-suvr_pet.tsv)",
                         file=folder, subject=sub)
    return out


def _to_atlas(table: pd.DataFrame, path: Path, sub: str, mapping: dict | None, atlas_names: set) -> pd.DataFrame:
    names = table["region"].astype(str).str.strip()
    if mapping is not None:
        keep = names.isin(set(mapping))
        table, names = table[keep], names[keep].map(mapping)
    unknown = sorted(set(names) - atlas_names)
    if unknown:
        hint = "the mapping file maps to" if mapping is not None else "use atlas region names or give a mapping file;"
        raise InputError(f"{len(unknown)} region name(s) are not atlas regions ({hint} names from the atlas table), "
                         f"e.g. {', '.join(unknown[:3])}", file=path, subject=sub)
    repeated = sorted(set(names[names.duplicated()]))
    if repeated:
        raise InputError(f"region(s) listed twice in one visit: {', '.join(repeated[:5])}", file=path, subject=sub)
    out = pd.DataFrame({"region": names.to_numpy()})
    for column in ("suvr", "volume_mm3"):
        if column in table.columns:
            values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
            bad = ~np.isfinite(values) | (values <= 0)
            if bad.any():
                row = int(np.argmax(bad))
                raise InputError(f"{column} must be a positive number in every row; region {out['region'].iloc[row]} "
                                 f"has {str(table[column].iloc[row])!r}", file=path, subject=sub)
            out[column] = values
    return out


def atlas_volumes() -> pd.DataFrame:
    """(region, volume_mm3) of the run's atlas on its own grid (a subject without a T1w)."""
    from neurohybrid.anatomy.atlas import _native_atlas, region_table
    from neurohybrid.preprocessing.parcellation import regional_volumes

    img = _native_atlas()
    voxel = float(abs(np.linalg.det(img.affine[:3, :3])))
    return regional_volumes(np.asarray(img.dataobj), voxel, region_table())


def run_regional(bids, subject, out, *, mapping=None) -> list[Path]:
    """Write the derivatives `neurohybrid inputs` reads, from the subject's regional tables."""
    from neurohybrid.anatomy.atlas import _native_atlas, region_table
    from neurohybrid.preprocessing import connectome as cx

    bids, out = Path(bids), Path(out)
    sub = layout.subject_label(subject)
    sessions_path = bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv"
    listed = read_table(sessions_path, subject=sub, required=["session_id"])
    known = {str(s).removeprefix("ses-") for s in listed["session_id"]}
    regions = region_table()
    names = set(regions["name"])
    lookup = read_mapping(mapping) if mapping else None
    d = Derivatives(out, sub)
    visits = {}
    for ses, (table, path) in _visit_tables(bids, sub).items():
        if ses not in known:
            raise InputError(f"visit {ses!r} is not a session of {sessions_path.name} ({', '.join(sorted(known))})",
                             file=path, subject=sub)
        visits[ses] = (_to_atlas(table, path, sub, lookup, names), path)
    written = []
    for ses, (table, _path) in visits.items():
        write_tsv(d.suvr(ses), table[["region", "suvr"]])
        written.append(d.suvr(ses))
    given = [(t, p) for t, p in visits.values() if "volume_mm3" in t.columns]
    volumes = atlas_volumes()
    if given:
        table, _path = given[0]
        own = dict(zip(table["region"], table["volume_mm3"]))
        volumes["volume_mm3"] = [own.get(r, np.nan) for r in volumes["region"]]
    write_tsv(d.volumes, volumes)
    # the atlas itself as the parcellation: every region present (the tables say nothing of a
    # subject parcellation that could lack one), so the connectome is the normative one on all regions
    cx.write_connectome(d.connectivity, cx.normative_for_subject(_native_atlas(), regions, subject=sub))
    layout.write_dataset_description(out)
    return written
