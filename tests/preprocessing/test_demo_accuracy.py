"""Accuracy against the demo cohort's ground truth (neurohybrid synth): the issue's thresholds.

Slow: generates a 2 mm glioma and a 2 mm Alzheimer's subject (with DWI) and runs the full
registration schedule. Thresholds (issue 4): template labels warped into the subject vs truth,
Dice >= 0.85 for GM and WM and >= 0.75 mean over DK regions; segmentation Dice >= 0.85.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import dice  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from neurohybrid.preprocessing.pipeline import run_anat
    from neurohybrid.synth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("demo")
    generate_cohort(root / "bids", root / "truth", glioma=1, alzheimer=1, dwi_subjects=1, voxel_mm=2.0, seed=4)
    subjects = sorted(p.name[4:] for p in (root / "bids").glob("sub-*") if p.is_dir())
    from neurohybrid.preprocessing.align import run_align

    for s in subjects:
        run_align(root / "bids", s, root / "out", fast=False, threads=2)
        run_anat(root / "bids", s, root / "out", model_voxel_mm=2.0, fast=False, threads=2)
    return root, subjects


def _g(path):
    return nib.load(str(path)).get_fdata()


def test_warped_template_labels_and_segmentation_match_truth(cohort):
    import ants

    from neurohybrid.anatomy.templates import load_template
    from neurohybrid.preprocessing import ants_backend as ab
    from neurohybrid.preprocessing.layout import Derivatives

    root, subjects = cohort
    for s in subjects:
        d = Derivatives(root / "out", s)
        truth = root / "truth" / f"sub-{s}"
        t1 = ants.image_read(str(d.preproc_t1w))
        for tissue in ("GM", "WM"):
            true = _g(truth / f"sub-{s}_label-{tissue}_desc-truth_probseg.nii.gz") > 0.5
            warped = ab.apply(ab.to_ants(load_template(tissue.lower(), 2.0)), t1, d.inverse_transforms,
                              invert=ab.INVERSE_INVERT).numpy() > 0.5
            assert dice(warped, true) >= 0.85, (s, tissue, "warped template")
            assert dice(_g(d.probseg(tissue)) > 0.5, true) >= 0.85, (s, tissue, "segmentation")
        dk, tdk = _g(d.dseg).astype(int), _g(truth / f"sub-{s}_atlas-DK_dseg.nii.gz").astype(int)
        ids = [i for i in np.unique(tdk) if i > 0]
        assert np.mean([dice(dk == i, tdk == i) for i in ids]) >= 0.75, s


def test_pet_and_dwi_connectome_on_demo(cohort):
    from neurohybrid.io.tsv import read_connectome
    from neurohybrid.preprocessing.pipeline import run_connectome, run_lesions, run_pet

    root, subjects = cohort
    ad = [s for s in subjects if s.startswith("ad")][0]
    for path in run_pet(root / "bids", ad, root / "out"):
        tab = pd.read_csv(path, sep="\t")
        assert len(tab) == 83 and tab["suvr"].notna().sum() >= 80
    tsv = run_connectome(root / "bids", ad, root / "out")
    assert json.loads(tsv.with_suffix("").with_suffix(".json").read_text())["Source"] == "dwi-dipy"
    w, names = read_connectome(tsv)
    assert w.shape == (83, 83) and (w > 0).sum() > 100
    glioma = [s for s in subjects if s.startswith("glioma")][0]
    written = run_lesions(root / "bids", glioma, root / "out")
    assert any("T1Gd" in p.name for p in written)
