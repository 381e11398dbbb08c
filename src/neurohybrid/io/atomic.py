"""Atomic output: write to a temporary file beside the target, then rename.

An interrupted or failing writer therefore never leaves a half-written file where a
workflow (or a user) would take it for a finished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.tsv``) so libraries
    that pick a format from the extension still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_tsv(path: str | Path, frame, **kwargs) -> None:
    """Write a pandas DataFrame as a tab-separated file, atomically, with 'n/a' for missing values (BIDS)."""
    kwargs.setdefault("index", False)
    kwargs.setdefault("na_rep", "n/a")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", **kwargs)


def _json_default(obj):
    # numpy scalars and arrays show up in parameter dictionaries
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
