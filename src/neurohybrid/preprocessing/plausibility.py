"""Checks that a preprocessed brain is a human brain before anything is written.

A constant or pure-noise "T1w" goes through N4, registration and Atropos without an error and
comes out as litres of grey and white matter; the models would then run on it. The bounds are
deliberately wide (they catch wrong input, not unusual anatomy): adult brain parenchyma is about
1.0-1.6 l (e.g. Allen et al. 2002, Neurology 58:1221, 1.13 l women / 1.26 l men on average), and
atrophy, large lesions or a child's brain stay well inside 0.5-2.0 l.
"""

from __future__ import annotations

import numpy as np

from neurohybrid.errors import InputError

PARENCHYMA_ML = (500.0, 2000.0)  # GM + WM volume
MIN_CONTRAST = 0.02  # coefficient of variation of the intensity inside the brain mask
GM_SHARE = (0.25, 0.80)  # GM / (GM + WM)


def check_tissue_volumes(probs: dict, voxel_ml: float, *, file, subject) -> None:
    """Raise InputError naming the T1w when GM + WM volume or the GM share is outside the human range."""
    gm = float(np.sum(probs["GM"])) * voxel_ml
    wm = float(np.sum(probs["WM"])) * voxel_ml
    total = gm + wm
    lo, hi = PARENCHYMA_ML
    if not lo <= total <= hi:
        raise InputError(f"implausible brain after segmentation: GM + WM = {total:.0f} ml, outside {lo:.0f}-{hi:.0f} ml "
                         "(is this a T1-weighted head image with correct voxel sizes?)", file=file, subject=subject)
    share = gm / total
    if not GM_SHARE[0] <= share <= GM_SHARE[1]:
        raise InputError(f"implausible segmentation: grey matter is {share:.0%} of GM + WM, outside "
                         f"{GM_SHARE[0]:.0%}-{GM_SHARE[1]:.0%} (is this a T1-weighted image?)", file=file, subject=subject)


def check_contrast(values: np.ndarray, *, file, subject) -> None:
    """A T1w brain has grey/white/CSF contrast (coefficient of variation ~0.2-0.4 inside the brain
    mask); a constant image has none, and Atropos would then return its priors as a segmentation."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if values.size else 0.0
    cv = float(values.std()) / abs(mean) if mean else 0.0
    if cv < MIN_CONTRAST:
        raise InputError(f"the image has no tissue contrast inside the brain mask (coefficient of variation {cv:.3g}): "
                         "not a T1-weighted brain image", file=file, subject=subject)
