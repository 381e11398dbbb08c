"""Validated TSV/CSV input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError


def read_table(path: str | Path, *, subject: str | None = None, required: list[str] | None = None, sep=None) -> pd.DataFrame:
    """Read a TSV (or CSV, by extension) and check the required columns are present."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path, subject=subject)
    if sep is None:
        sep = "," if path.suffix == ".csv" else "\t"
    try:
        frame = pd.read_csv(path, sep=sep, na_values=["n/a"])
    except Exception as exc:
        raise InputError(f"cannot read table ({type(exc).__name__}: {exc})", file=path, subject=subject) from None
    _check_unique_header(path, sep, subject)
    missing = [c for c in (required or []) if c not in frame.columns]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}", file=path, subject=subject)
    return frame


def _check_unique_header(path: Path, sep: str, subject) -> None:
    """pandas renames a repeated column name to 'name.1', which would pass any later check: read
    the header row as it is written."""
    header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
    repeated = sorted({name for name in header if header.count(name) > 1 and name != ""})
    if repeated:
        raise InputError(f"repeated column name(s) in the header: {', '.join(repeated)}", file=path, subject=subject)


def read_connectome(path: str | Path, *, subject: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a square weighted connectome whose header row holds the region names.

    Accepts CSV or TSV, with or without a leading column of row names that repeats the header.
    The matrix must be square, finite, non-negative and symmetric.
    """
    path = Path(path)
    frame = read_table(path, subject=subject)
    names = [str(c) for c in frame.columns]
    if frame.shape[1] == frame.shape[0] + 1:
        # first column holds the row labels
        row_labels = [str(v) for v in frame.iloc[:, 0]]
        frame = frame.iloc[:, 1:]
        names = names[1:]
        if row_labels != names:
            raise InputError("row labels do not match the header's region names", file=path, subject=subject)
    if frame.shape[0] != frame.shape[1]:
        raise InputError(f"connectome must be square, got {frame.shape[0]} rows x {frame.shape[1]} columns", file=path, subject=subject)
    try:
        weights = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("connectome has non-numeric entries", file=path, subject=subject) from None
    if not np.all(np.isfinite(weights)):
        raise InputError("connectome has NaN or infinite entries", file=path, subject=subject)
    if np.any(weights < 0):
        raise InputError("connectome has negative weights", file=path, subject=subject)
    scale = max(np.abs(weights).max(), 1e-300)
    if not np.allclose(weights, weights.T, atol=1e-8 * scale, rtol=1e-6):
        raise InputError("connectome is not symmetric", file=path, subject=subject)
    if len(set(names)) != len(names):
        raise InputError("connectome header has duplicate region names", file=path, subject=subject)
    return weights, names
