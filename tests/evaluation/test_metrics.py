import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from neurohybrid.evaluation import metrics as M

from evaluation_builders import cube


def brute_surface(mask):
    """Independent surface: a voxel in the mask with a face-neighbour outside it (or off the grid)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        p = tuple(i + 1 for i in idx)
        for ax in range(3):
            for step in (-1, 1):
                q = list(p)
                q[ax] += step
                if not padded[tuple(q)]:
                    out[idx] = True
    return out


def brute_hd95(a, b, spacing):
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_two_cubes_known_overlap():
    a = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))  # 64 voxels
    b = cube((10, 10, 10), (4, 2, 2), (8, 6, 6))  # 64 voxels, 32 shared
    assert M.dice(a, b) == pytest.approx(0.5)
    assert M.dice(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0
    empty = np.zeros_like(a)
    assert M.dice(empty, empty) == 1.0


def test_volume_ml_uses_spacing():
    a = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    assert M.volume_ml(a, (2.0, 1.0, 1.5)) == pytest.approx(64 * 3.0 / 1000)


def test_hd95_single_voxels_exact_anisotropic():
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros((8, 8, 8), bool)
    a[1, 1, 1] = True
    b[4, 5, 1] = True
    assert M.hausdorff95(a, b, (1, 1, 1)) == pytest.approx(5.0)
    assert M.hausdorff95(a, b, (2, 1, 1)) == pytest.approx(math.sqrt(36 + 16))


def test_hd95_identical_is_zero_and_empty_cases():
    a = cube((9, 9, 9), (2, 2, 2), (7, 7, 7))
    assert M.hausdorff95(a, a, (1, 2, 3)) == 0.0
    empty = np.zeros_like(a)
    assert M.hausdorff95(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(M.hausdorff95(a, empty, (1, 1, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    spacing = (1.0, 1.5, 2.5)
    a = ndimage.gaussian_filter(rng.random((14, 12, 10)), 1.5) > 0.5
    b = ndimage.gaussian_filter(rng.random((14, 12, 10)), 1.5) > 0.5
    assert a.any() and b.any()
    assert M.hausdorff95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-9)


def test_hd95_shifted_cube_brute_force():
    a = cube((12, 12, 12), (2, 2, 2), (7, 7, 7))
    b = cube((12, 12, 12), (5, 2, 2), (10, 7, 7))
    assert M.hausdorff95(a, b, (2, 1, 1)) == pytest.approx(brute_hd95(a, b, (2, 1, 1)))
    # a shift of 3 voxels of 2 mm: no surface point is farther than 6 mm from the other surface
    assert M.hausdorff95(a, b, (2, 1, 1)) <= 6.0 + 1e-9


def test_rmse_and_pearson():
    obs = np.array([1.0, 2.0, 3.0, 4.0])
    pred = obs + np.array([1.0, -1.0, 1.0, -1.0])
    assert M.rmse(pred, obs) == pytest.approx(1.0)
    assert M.pearson_r(2 * obs + 1, obs) == pytest.approx(1.0)
    assert M.pearson_r(-obs, obs) == pytest.approx(-1.0)
    x = np.array([1.0, 2.0, 3.0])
    y = np.array([1.0, 3.0, 2.0])
    # hand-computed: deviations (-1,0,1) and (-1,1,0): r = 1 / (sqrt 2 * sqrt 2)
    assert M.pearson_r(x, y) == pytest.approx(0.5)
    assert math.isnan(M.pearson_r(np.ones(4), obs))
    assert M.relative_error(1.0, 2.0) == 0.5
    assert math.isnan(M.relative_error(1.0, 0.0))


def test_parameter_matching_by_path_and_unique_leaf():
    est = {"dw": 0.3, "rho": 0.02, "seed": {"x": 3.0}, "only_fitted": 1.0, "flag": True}
    truth = {"glioma": {"dw": 0.2, "rho": 0.025}, "seed": {"x": 4.0}, "other": {"x": 9.0}}
    pairs = M.match_parameters(est, truth)
    assert pairs == {"dw": (0.3, 0.2), "rho": (0.02, 0.025), "seed.x": (3.0, 4.0)}
    err = M.parameter_errors(est, truth)
    assert err["param_abs_error_dw"] == pytest.approx(0.1)
    assert err["param_rel_error_dw"] == pytest.approx(0.5)
    assert err["param_rel_error_seed.x"] == pytest.approx(0.25)
    # an ambiguous leaf ('x' under two parents) is not guessed
    assert "x" not in M.match_parameters({"x": 1.0}, truth)


def pooled_hd95(a, b, spacing):
    """MedPy's hd95 convention: the 95th percentile of both directed distance sets pooled."""
    return float(np.percentile(np.hstack([M.directed_surface_distances(a, b, spacing),
                                          M.directed_surface_distances(b, a, spacing)]), 95))


def test_hd95_convention_is_the_larger_directed_percentile_not_medpys_pooled_one():
    """The docstring's claim: max of the two directed 95th percentiles. A forecast that adds a far
    island (34 surface voxels, 6.5% of its surface but 3.4% of both surfaces together) to a perfect
    lesion: 13 mm here, 0 mm by MedPy's pooled percentile."""
    a = np.zeros((30, 20, 20), bool)
    a[2:12, 5:15, 5:15] = True
    b = a.copy()
    b[24:28, 8:11, 8:11] = True
    assert M.hausdorff95(b, a, (1, 1, 1)) == M.hausdorff95(a, b, (1, 1, 1)) == pytest.approx(13.0)
    assert pooled_hd95(a, b, (1, 1, 1)) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_hd95_is_never_below_the_pooled_percentile_on_random_masks(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for _ in range(10):
        a = ndimage.gaussian_filter(rng.random((12, 11, 9)), 1.2) > 0.5
        b = ndimage.gaussian_filter(rng.random((12, 11, 9)), 1.2) > 0.5
        if a.any() and b.any():
            spacing = rng.uniform(0.5, 3.0, 3)
            assert M.hausdorff95(a, b, spacing) >= pooled_hd95(a, b, spacing) - 1e-9
