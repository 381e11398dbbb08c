"""Normative structural connectome: tvb-data's DK-68 cortical connectivity with canonical names.

tvb-data ships ``connectivity/connectivity_68.zip`` holding bz2-compressed text files
(weights.txt, tract_lengths.txt, centres.txt with names such as ``r_lateralorbitofrontal``).
We read the zip directly (tvb-data has no loader of its own worth importing).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import zipfile
from pathlib import Path

import numpy as np

from neurohybrid.errors import InputError


def connectivity_zip_path() -> Path:
    spec = importlib.util.find_spec("tvb_data")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the tvb-data package (which ships the normative DK-68 connectome) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "connectivity" / "connectivity_68.zip"


def _read_member(archive: zipfile.ZipFile, stem: str) -> str:
    names = archive.namelist()
    if f"{stem}.txt.bz2" in names:
        return bz2.decompress(archive.read(f"{stem}.txt.bz2")).decode()
    if f"{stem}.txt" in names:
        return archive.read(f"{stem}.txt").decode()
    raise InputError(f"{stem}.txt missing from the connectivity archive", file=archive.filename)


def tvb_to_canonical(name: str) -> str:
    """`r_lateralorbitofrontal` -> `R_lateralorbitofrontal` (the atlas' canonical naming)."""
    side, _, label = name.partition("_")
    if side.lower() not in ("l", "r") or not label:
        raise InputError(f"unexpected region name {name!r} in the normative connectome")
    return f"{side.upper()}_{label}"


@functools.lru_cache(maxsize=1)
def _load_tvb68():
    path = connectivity_zip_path()
    if not path.exists():
        raise InputError("normative connectome archive not found", file=path)
    with zipfile.ZipFile(path) as archive:
        weights = np.loadtxt(_read_member(archive, "weights").splitlines())
        lengths = np.loadtxt(_read_member(archive, "tract_lengths").splitlines())
        centres = [line.split()[0] for line in _read_member(archive, "centres").splitlines() if line.strip()]
    names = [tvb_to_canonical(n) for n in centres]
    # the shipped matrix is exactly symmetric; symmetrising guards a future data release.
    # Its diagonal holds intra-region weights: they cancel in a graph Laplacian and are not
    # edges between regions, so they are dropped (region-to-region connectome).
    weights = 0.5 * (weights + weights.T)
    np.fill_diagonal(weights, 0.0)
    return weights, lengths, names


@functools.lru_cache(maxsize=4)
def _load_user(path: str):
    from neurohybrid.io.tsv import read_connectome

    weights, names = read_connectome(path)
    weights = 0.5 * (weights + weights.T)
    np.fill_diagonal(weights, 0.0)  # region-to-region, as for the shipped one
    return weights, None, names


def connectome_file() -> Path | None:
    """The run's connectome TSV (active resources manifest), or None: tvb-data's archive."""
    from neurohybrid.anatomy.active import active_path

    return active_path("connectome")


def normative_connectome(names=None, *, lengths: bool = False):
    """(weights (N, N), names) of the run's normative connectome, non-negative and symmetric.

    The active resources manifest's connectome (neurohybrid.anatomy.resources: ``resources/`` or
    the user's), else tvb-data's DK-68. ``names``: a list of canonical region names to pick and
    order rows/columns by (e.g. the cortical regions of the DK atlas table); an unknown name
    raises InputError. With ``lengths=True`` returns (weights, tract_lengths_mm, names); a
    connectome given as a TSV has no tract lengths.
    """
    chosen = connectome_file()
    weights, tract_lengths, all_names = _load_tvb68() if chosen is None else _load_user(str(chosen))
    if lengths and tract_lengths is None:
        raise InputError("the connectome has no tract lengths (only tvb-data's archive ships them)", file=chosen)
    if names is None:
        picked = list(all_names)
        index = np.arange(len(all_names))
    else:
        picked = [str(n) for n in names]
        lookup = {n: i for i, n in enumerate(all_names)}
        missing = [n for n in picked if n not in lookup]
        if missing:
            raise InputError(f"region(s) not in the normative connectome: {', '.join(missing[:5])}", file=chosen)
        index = np.array([lookup[n] for n in picked], dtype=int)
    w = weights[np.ix_(index, index)].copy()
    if lengths:
        return w, tract_lengths[np.ix_(index, index)].copy(), picked
    return w, picked
