"""Issue 16, glioma: a visible lesion on every contrast and a mass effect that is a diffeomorphism
growing with the tumour."""

import nibabel as nib
import numpy as np
import pytest

from neurohybrid.solvers.glioma import gaussian_seed
from neurohybrid.synth import glioma, mass_effect
from neurohybrid.synth.anatomy import make_subject_anatomy
from neurohybrid.synth.warp import jacobian_determinant

VOXEL = 4.0


@pytest.fixture(scope="module")
def anat():
    return make_subject_anatomy("realism", VOXEL, np.random.default_rng(5))


def _tumour(anat, sigma_mm):
    """A saturated centre (u = 1, as a grown Fisher-Kolmogorov tumour) with a smooth edge."""
    seed = glioma.pick_seed(anat, np.random.default_rng(1))
    u = np.clip(2.0 * gaussian_seed(anat.shape, (VOXEL,) * 3, seed, sigma_mm=sigma_mm, amplitude=1.0), 0, 1)
    return (u * anat.brain).astype(np.float32)


def test_the_mass_effect_is_a_diffeomorphism_whose_push_grows_with_the_tumour(anat):
    peaks = []
    for sigma in (5.0, 9.0, 13.0):
        u = _tumour(anat, sigma)
        disp, info = mass_effect.displacement(u, anat.brain, VOXEL, fraction=0.6)
        # the pull-back (the map the images go through) and the forward push: both fold-free
        assert jacobian_determinant(disp * VOXEL, VOXEL).min() > 0
        assert info["jacobian_min"] > 0
        peaks.append(np.sqrt((disp**2).sum(-1)).max() * VOXEL)
        # the skull does not move
        outside = ~anat.brain
        assert np.abs(disp[outside]).max() * VOXEL < 0.05 * peaks[-1]
    assert peaks[0] < peaks[1] < peaks[2]
    assert peaks[-1] > 2.0  # millimetres: a visible push, not a rounding error


def test_the_push_inflates_the_tumour_by_the_drawn_fraction(anat):
    """The generator's first-session size rule assumes the image shows the tumour x (1 + fraction)."""
    u = _tumour(anat, 11.0)
    for fraction in (0.2, 0.6):
        disp, _ = mass_effect.displacement(u, anat.brain, VOXEL, fraction=fraction)
        seen = mass_effect.pull_back(u, disp)
        ratio = (seen >= 0.7).sum() / (u >= 0.7).sum()
        assert ratio == pytest.approx(1.0 + fraction, rel=0.2)


def test_no_tumour_no_displacement(anat):
    disp, info = mass_effect.displacement(np.zeros(anat.shape, np.float32), anat.brain, VOXEL, fraction=0.6)
    assert not disp.any() and info["max_displacement_mm"] == 0.0


def test_tissue_is_pushed_away_from_the_tumour(anat):
    u = _tumour(anat, 11.0)
    disp, info = mass_effect.displacement(u, anat.brain, VOXEL, fraction=0.6)
    centre = np.array(info["centre_voxel"])
    rel = np.moveaxis(np.indices(anat.shape, dtype=float), 0, -1) - centre
    r = np.sqrt((rel**2).sum(-1))
    ring = anat.brain & (r * VOXEL > 10) & (r * VOXEL < 30)
    # the pull-back looks back towards the tumour: the tissue seen at x came from closer to it
    radial = (disp * rel).sum(-1)[ring] / r[ring]
    assert np.median(radial) < -0.3


def test_the_displaced_anatomy_sees_the_template_where_the_undisplaced_one_did(anat):
    u = _tumour(anat, 11.0)
    disp, _ = mass_effect.displacement(u, anat.brain, VOXEL, fraction=0.6)
    moved = mass_effect.displaced_anatomy(anat, disp)
    x = np.argwhere(anat.brain & (np.sqrt((disp**2).sum(-1)) > 0.5))[:50]
    src = x + disp[tuple(x.T)]
    # the undisplaced anatomy's template points at x + d(x), by trilinear interpolation
    from scipy import ndimage

    want = np.stack([ndimage.map_coordinates(anat.template_points()[..., c], src.T, order=1) for c in range(3)], -1)
    np.testing.assert_allclose(moved.template_points()[tuple(x.T)], want, atol=1e-6)
    assert moved.brain.sum() == pytest.approx(anat.brain.sum(), rel=0.05)


def test_the_tumour_is_hypointense_on_t1w_with_a_dark_core_and_an_enhancing_rim(anat):
    params = glioma.draw_parameters(np.random.default_rng(2))
    u = _tumour(anat, 12.0)
    img = glioma.clean_images(anat, u, params)
    core = u >= params["image"]["theta_necrosis"]
    rim = (u >= params["theta_t1gd"] + 0.05) & (u < params["image"]["theta_necrosis"] - 0.02)
    wm = (anat.wm > 0.9) & (u < 1e-3)
    assert core.sum() >= 3 and rim.sum() >= 3
    assert img["T1w"][core].mean() < 0.8 * img["T1w"][wm].mean()
    enhancement = img["ceT1w"] - img["T1w"]
    assert enhancement[rim].mean() > 5 * max(enhancement[core].mean(), 1e-9)
    assert enhancement[wm].max() < 1e-3 * img["T1w"][wm].mean()  # logistic tails only
    oedema = (u >= params["theta_flair"] + 0.05) & (u < params["theta_t1gd"] - 0.05)
    assert oedema.sum() >= 3
    assert img["FLAIR"][oedema].mean() > 1.2 * img["FLAIR"][wm].mean()


def test_a_written_patient_has_a_dark_core_and_a_growing_mass_effect(tmp_path, anat):
    rng = np.random.default_rng(11)
    params, first = glioma.write_subject("realism", anat, rng, tmp_path / "bids", tmp_path / "truth")
    effects = params["mass_effect"]
    assert [e["session"] for e in effects] == ["01", "02", "03"]
    assert effects[0]["max_displacement_mm"] < effects[-1]["max_displacement_mm"]
    assert all(e["jacobian_min"] > 0 for e in effects)
    t1 = nib.load(tmp_path / "bids/sub-realism/ses-03/anat/sub-realism_ses-03_T1w.nii.gz").get_fdata()
    u = nib.load(tmp_path / "truth/sub-realism/sub-realism_ses-03_desc-tumour_density.nii.gz").get_fdata()
    core = u >= params["image"]["theta_necrosis"]
    assert core.sum() >= 2
    # white matter of the displaced first-session anatomy, away from the tumour
    wm = (first.wm > 0.9) & (u < 1e-3)
    assert np.median(t1[core]) < np.median(t1[wm])
    # the annotated masks follow the displaced tumour
    t1gd = nib.load(next((tmp_path / "bids/derivatives/lesions/sub-realism/ses-03/anat").glob("*T1Gd*_mask.nii.gz")))
    seen = np.asarray(t1gd.dataobj) > 0
    assert (seen & (u >= params["theta_t1gd"])).sum() >= 0.8 * seen.sum()
