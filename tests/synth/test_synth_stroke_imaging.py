"""Issue 16, stroke: the acute core on diffusion imaging, the final infarct on follow-up T1w/FLAIR."""

import nibabel as nib
import numpy as np

from neurohybrid.evaluation.metrics import dice
from neurohybrid.synth import stroke
from neurohybrid.synth.anatomy import make_subject_anatomy


def _load(path):
    return np.asarray(nib.load(path).dataobj, float)


def test_follow_up_images_show_the_final_infarct_and_the_acute_dwi_its_core(tmp_path):
    rng = np.random.default_rng(7)
    anat = make_subject_anatomy("imaging", 4.0, rng)
    params = stroke.write_subject("imaging", anat, rng, tmp_path / "bids", tmp_path / "truth")
    bids = tmp_path / "bids"
    fu = bids / "derivatives/lesions/sub-imaging/ses-followup/anat/sub-imaging_ses-followup_space-T1w_desc-infarct_mask.nii.gz"
    final = _load(fu) > 0
    assert final.sum() >= 10
    flair = _load(bids / "sub-imaging/ses-followup/anat/sub-imaging_ses-followup_FLAIR.nii.gz")
    t1 = _load(bids / "sub-imaging/ses-followup/anat/sub-imaging_ses-followup_T1w.nii.gz")
    # healthy tissue of the other hemisphere's mirror image is the reference a reader would use
    healthy = anat.brain & ~np.flip(final, 0) & ~final & (anat.wm + anat.gm > 0.9)
    hyper = anat.brain & (flair > np.percentile(flair[healthy], 99.5))
    assert dice(hyper, final) > 0.6
    assert np.median(t1[final]) < np.median(t1[np.flip(final, 0) & ~final & anat.brain])
    # acute diffusion: ADC from b0 and the mean of the b = 1000 volumes
    dwi = _load(bids / "sub-imaging/ses-acute/dwi/sub-imaging_ses-acute_dwi.nii.gz")
    bvals = np.loadtxt(bids / "sub-imaging/ses-acute/dwi/sub-imaging_ses-acute_dwi.bval")
    assert params["dwi"]["n_directions"] == 3 and sorted(set(bvals)) == [0.0, 1000.0]
    b0, b1000 = dwi[..., bvals == 0].mean(-1), dwi[..., bvals == 1000].mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = -np.log(np.clip(b1000, 1, None) / np.clip(b0, 1, None)) / 1000.0
    core = _load(bids / "derivatives/lesions/sub-imaging/ses-acute/anat/sub-imaging_ses-acute_space-T1w_desc-infarct_mask.nii.gz") > 0
    assert core.sum() >= 5
    tissue = anat.brain & (anat.wm + anat.gm > 0.95) & ~final & ~np.flip(final, 0)
    assert np.median(adc[core]) < 620e-6 < np.median(adc[tissue])
