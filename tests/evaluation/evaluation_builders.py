"""Builders of small target/forecast folders in the layout of docs/architecture.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neurohybrid.io import save_volume


def affine_for(voxel_mm):
    aff = np.eye(4)
    aff[:3, :3] = np.diag(voxel_mm)
    aff[:3, 3] = [-10.0, -12.0, -8.0]
    return aff


def write_target(root: Path, subject: str, disorder: str, arrays: dict, meta: dict) -> None:
    folder = root / f"sub-{subject}"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"sub-{subject}_desc-target.npz", **arrays)
    (folder / f"sub-{subject}_desc-target.json").write_text(json.dumps(meta))


def write_fit(folder: Path, subject: str, model: str, **fit) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fit.setdefault("parameters", {})
    fit.setdefault("fit_seconds", 1.5)
    fit.setdefault("inference_seconds", 0.25)
    fit.setdefault("fold", 0)
    (folder / f"sub-{subject}_model-{model}_desc-fit.json").write_text(json.dumps(fit))


def cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.fixture
def glioma_case(tmp_path):
    """Target: T1Gd cube [2:6]^3, FLAIR cube [1:7]^3; forecast shifted by 2 voxels along x."""
    voxel = [2.0, 1.0, 1.0]
    shape = (10, 10, 10)
    aff = affine_for(voxel)
    t1gd = cube(shape, (2, 2, 2), (6, 6, 6))
    flair = cube(shape, (1, 1, 1), (7, 7, 7))
    targets = tmp_path / "targets"
    write_target(targets, "g1", "glioma", {"t1gd": t1gd, "flair": flair},
                 {"affine": aff.tolist(), "voxel_mm": voxel, "day": 120.0})
    fdir = tmp_path / "forecasts" / "sub-g1"
    save_volume(fdir / "sub-g1_model-mechanistic_desc-T1Gd_mask.nii.gz", cube(shape, (4, 2, 2), (8, 6, 6)), aff, dtype=np.uint8)
    save_volume(fdir / "sub-g1_model-mechanistic_desc-FLAIR_mask.nii.gz", flair, aff, dtype=np.uint8)
    write_fit(fdir, "g1", "mechanistic", parameters={"dw": 0.3, "rho": 0.025, "seed_x": 4.0, "t0_days": 200.0,
                                                     "theta_t1gd": 0.7, "theta_flair": 0.25})
    truth = tmp_path / "groundtruth" / "sub-g1"
    truth.mkdir(parents=True)
    # the synth's layout (synth.cohort): the disorder's parameters under "disease"
    (truth / "sub-g1_desc-truth_params.json").write_text(json.dumps(
        {"disease": {"dw": 0.2, "rho": 0.025, "theta_t1gd": 0.6, "theta_flair": 0.2}, "voxel_mm": 2.0}))
    return tmp_path, aff, voxel
