"""Treated virtual glioma patients: which ones, what is written, and that nothing else changes."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from neurohybrid.disorders.glioma import treatment as rt
from neurohybrid.synth.cohort import generate_subject, treated_after_session


def test_every_second_glioma_patient_is_treated_alternately_after_the_first_and_second_session():
    assert [treated_after_session(i, 2) for i in range(6)] == [None, 0, None, 1, None, 0]
    assert [treated_after_session(i, 0) for i in range(4)] == [None] * 4


def _digests(root, subject):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and subject in p.name}


@pytest.mark.slow  # two sloppy subjects: ~30 s on the shared 2-core machine
def test_a_treated_patient_differs_from_its_untreated_self_only_after_the_treatment(tmp_path):
    kw = dict(voxel_mm=4.0, seed=5)
    roots = {}
    for every in (0, 2):  # index 1: untreated with every=0, treated after its first session with every=2
        roots[every] = (tmp_path / f"e{every}" / "bids", tmp_path / f"e{every}" / "truth")
        generate_subject("glioma", 1, bids_dir=roots[every][0], truth_dir=roots[every][1], glioma_treated_every=every, **kw)
    plain, treated = (_digests(roots[e][0], "glioma02") for e in (0, 2))
    # the first session's images and masks are the same bytes (same random stream); later ones differ
    ses1 = [k for k in plain if "ses-01" in k]
    assert ses1 and all(plain[k] == treated[k] for k in ses1)
    later = [k for k in plain if "ses-03" in k and k.endswith("FLAIR.nii.gz")]
    assert later and all(plain[k] != treated[k] for k in later)
    assert not rt.table_path(roots[0][0], "glioma02").exists()
    bids = roots[2][0]
    [course] = rt.read_table(bids, "glioma02", [("01", 0.0), ("02", 60.0), ("03", 150.0)])
    assert (course.fractions, course.dose_gy, course.per_week, course.target_session) == (30, 2.0, 5, "01")
    target = np.asarray(nib.load(str(bids / course.target_mask)).dataobj) > 0
    flair1 = np.asarray(nib.load(str(next(bids.rglob("*ses-01*desc-FLAIR_mask.nii.gz")))).dataobj) > 0
    assert target.sum() > flair1.sum() and target[flair1].mean() > 0.95  # the tumour + margin
    truth = json.loads(next(roots[2][1].rglob("*truth_params.json")).read_text())["disease"]["treatment"]
    assert 0.005 <= truth["alpha"] <= 0.03 and truth["beta"] == truth["alpha"] / 10.0
    assert truth["fraction_days"] == course.fraction_days()
