import json

import nibabel as nib
import numpy as np

from neurohybrid.synth.cohort import generate_cohort
from neurohybrid.synth.warp import warp_to_subject
from neurohybrid.synth.anatomy import template_set


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_same_bytes(cohort, cohort_args, tmp_path):
    bids, truth, _ = cohort
    # the second run also uses two worker processes: the bytes must not depend on it
    generate_cohort(tmp_path / "bids", tmp_path / "truth", **cohort_args, jobs=2)
    for a_root, b_root in ((bids, tmp_path / "bids"), (truth, tmp_path / "truth")):
        files = _files(a_root)
        assert files == _files(b_root)
        different = [str(f) for f in files if (a_root / f).read_bytes() != (b_root / f).read_bytes()]
        assert different == []


def test_ground_truth_kept_apart(cohort):
    bids, truth, _ = cohort
    bids_names = {p.name for p in bids.rglob("*")}
    truth_names = {p.name for p in truth.rglob("*") if p.is_file()}
    assert not any("truth" in n or "params" in n for n in bids_names)
    shared = (truth_names & bids_names) - {"dataset_description.json"}
    assert shared == set()
    # no true parameter value or key appears in any text file of the BIDS folder
    text = "\n".join(p.read_text() for p in bids.rglob("*")
                     if p.is_file() and p.suffix in (".json", ".tsv", ".bval", ".bvec", ""))
    for sub in ("glioma01", "ad01", "stroke01"):
        params = json.loads((truth / f"sub-{sub}" / f"sub-{sub}_desc-truth_params.json").read_text())["disease"]
        for key in ("rho", "dw", "kappa", "alpha", "collateral_strength", "hidden_clearance", "inflow_scale"):
            if key in params:
                assert f'"{key}"' not in text
                assert f"{params[key]:.6f}"[:8] not in text


def test_truth_atlas_matches_warp(cohort):
    _, truth, summary = cohort
    sub = "sub-ad01"
    warp = truth / sub / f"{sub}_from-MNI152NLin2009cSym_to-T1w_desc-truth_warp.nii.gz"
    atlas = np.asarray(nib.load(str(truth / sub / f"{sub}_atlas-DK_dseg.nii.gz")).dataobj)
    rewarped = np.asarray(warp_to_subject(template_set(summary["voxel_mm"])["atlas"], warp, order=0).dataobj)
    assert np.array_equal(rewarped, atlas)
    assert len(np.unique(atlas)) > 70


def test_written_t1_is_the_warped_template(cohort):
    bids, truth, summary = cohort
    sub = "sub-stroke01"
    warp = truth / sub / f"{sub}_from-MNI152NLin2009cSym_to-T1w_desc-truth_warp.nii.gz"
    t1 = nib.load(str(bids / sub / "ses-acute" / "anat" / f"{sub}_ses-acute_T1w.nii.gz"))
    expected = warp_to_subject(template_set(summary["voxel_mm"])["t1"], warp).get_fdata()
    unwarped = template_set(summary["voxel_mm"])["t1"].get_fdata()
    data = t1.get_fdata()
    corr = np.corrcoef(data.ravel(), expected.ravel())[0, 1]
    corr_unwarped = np.corrcoef(data.ravel(), unwarped.ravel())[0, 1]
    assert corr > 0.97
    assert corr > corr_unwarped  # the warp is real, and the truth describes it
    assert not np.allclose(t1.affine, template_set(summary["voxel_mm"])["t1"].affine)  # rigid pose in the affine


def test_pet_reference_region_is_one(cohort):
    bids, truth, _ = cohort
    sub = "sub-ad01"
    pet = nib.load(str(bids / sub / "ses-04" / "pet" / f"{sub}_ses-04_trc-AV1451_pet.nii.gz")).get_fdata()
    cereb = np.asarray(nib.load(str(truth / sub / f"{sub}_desc-cerebellum_mask.nii.gz")).dataobj) > 0
    assert cereb.sum() > 50
    assert abs(pet[cereb].mean() - 1.0) < 0.02
