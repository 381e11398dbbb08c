"""Which template, atlas and connectome files the anatomy loaders read: the active resources
manifest (written by `neurohybrid resources resolve`, activated by `neurohybrid --resources`), or
none, and then the installed packages. A leaf module: the loaders and neurohybrid.anatomy.resources
both import it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from neurohybrid.errors import InputError

# BIDS-style names (templateflow's tpl-<space> naming for the template and atlas)
FILES = {
    "template_t1": "tpl-MNI152NLin2009cSym_res-1_T1w.nii.gz",
    "template_gm": "tpl-MNI152NLin2009cSym_res-1_label-GM_probseg.nii.gz",
    "template_wm": "tpl-MNI152NLin2009cSym_res-1_label-WM_probseg.nii.gz",
    "atlas": "tpl-MNI152NLin2009cSym_atlas-DK_dseg.nii.gz",
    "atlas_table": "tpl-MNI152NLin2009cSym_atlas-DK_dseg.tsv",
    "connectome": "atlas-DK_desc-normative_connectivity.tsv",
}
KEYS = tuple(FILES)
PROVENANCE = "resources.json"
# what must be given together: a template is T1 + tissue priors, an atlas is labels + names
GROUPS = {"template": ("template_t1", "template_gm", "template_wm"), "atlas": ("atlas", "atlas_table")}

_ACTIVE: dict | None = None


def active_path(key: str) -> Path | None:
    """The file the run uses for ``key`` (one of KEYS), or None: read the installed package."""
    if _ACTIVE is None:
        return None
    return Path(_ACTIVE["files"][key])


def active_source(key: str) -> str:
    """'user' when the run's file for ``key`` is the user's, else 'shipped'."""
    if _ACTIVE is None:
        return "shipped"
    return _ACTIVE["sources"][key]


def read_manifest(path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("resources manifest not found (written by `neurohybrid resources resolve`)", file=path) from None
    except ValueError as exc:
        raise InputError(f"resources manifest is not JSON ({exc})", file=path) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    sources = manifest.get("sources") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(sources, dict) or set(files) != set(KEYS) or set(sources) != set(KEYS):
        raise InputError(f"resources manifest needs 'files' and 'sources' for each of {', '.join(KEYS)}", file=path)
    for key, file in files.items():
        if not Path(file).exists():
            raise InputError(f"resource '{key}' not found", file=file)
    return manifest


def activate(manifest_path) -> None:
    """Make every anatomy loader read the manifest's files (checked when resolved)."""
    global _ACTIVE
    _ACTIVE = read_manifest(manifest_path)


def deactivate() -> None:
    global _ACTIVE
    _ACTIVE = None


@contextlib.contextmanager
def using(manifest_path):
    """Activate a manifest for the duration of a block (tests, scripts); None: the packages."""
    global _ACTIVE
    previous = _ACTIVE
    if manifest_path is None:
        _ACTIVE = None
    else:
        activate(manifest_path)
    try:
        yield
    finally:
        _ACTIVE = previous
