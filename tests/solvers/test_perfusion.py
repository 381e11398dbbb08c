"""One-compartment Darcy perfusion: calibration, symmetry, conservation, occlusion."""

import numpy as np
import pytest

from neurohybrid.errors import InputError
from neurohybrid.solvers.perfusion import darcy_operator, darcy_perfusion, inflow_scale_map


def _phantom(shape=(18, 12, 10), shell=3):
    """Box brain with a GM shell and a WM core, mirror-symmetric along x."""
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    gm = np.where(mask, 1.0, 0.0)
    wm = np.zeros(shape)
    wm[shell + 1:-shell - 1, shell + 1:-shell - 1, shell:-shell] = 1.0
    gm[wm > 0] = 0.0
    return mask, gm, wm


def test_zero_permeability_returns_the_normal_inflow():
    mask, gm, wm = _phantom()
    cbf = darcy_perfusion(mask, 0.0, gm=gm, wm=wm)
    assert np.allclose(cbf[mask], (56 * gm + 21 * wm)[mask], atol=1e-10)
    assert np.all(cbf[~mask] == 0)


def test_healthy_calibration_and_mass_balance():
    mask, gm, wm = _phantom((24, 20, 18), shell=2)
    cbf = darcy_perfusion(mask, gm=gm, wm=wm)  # default K = 1 mm^2/min: 1 mm redistribution length
    # voxels a few mm inside each tissue keep the calibrated value
    assert abs(cbf[12, 10, 9] - 21.0) < 1.0  # WM core centre
    assert abs(cbf[1, 1, 1] - 56.0) < 1.0  # GM corner
    assert abs(np.median(cbf[wm > 0]) - 21.0) < 4.0  # boundary voxels are blended over ~1 mm
    # finite volumes: every ml of inflow leaves through the venous term
    assert np.isclose(cbf.sum(), (56 * gm + 21 * wm)[mask].sum(), rtol=1e-10)


def test_symmetric_scenario_gives_symmetric_cbf():
    mask, gm, wm = _phantom()
    terr = np.zeros(mask.shape, bool)
    terr[:5] = True
    terr[-5:] = True  # both ends occluded alike
    cbf = darcy_perfusion(mask, 2.0, terr, 0.3, gm=gm, wm=wm)
    assert np.abs(cbf - cbf[::-1]).max() < 1e-9


def test_occluded_territory_has_lower_cbf_and_collaterals_help():
    mask, gm, wm = _phantom()
    healthy = darcy_perfusion(mask, 2.0, gm=gm, wm=wm)
    terr = np.zeros(mask.shape, bool)
    terr[:9] = True  # left half
    occl = darcy_perfusion(mask, 2.0, terr, 0.1, gm=gm, wm=wm)
    inside = terr & mask
    outside = ~terr & mask
    assert occl[inside].mean() < 0.3 * healthy[inside].mean()
    # the territory border receives flow from the patent side: above the 10 % of inflow it keeps
    assert occl[8, 6, 5] > 0.1 * healthy[8, 6, 5] * 1.5
    # and the patent side loses some of its flow to it
    assert occl[outside].mean() < healthy[outside].mean()
    # with no redistribution the occluded CBF is exactly 10 %
    none = darcy_perfusion(mask, 0.0, terr, 0.1, gm=gm, wm=wm)
    assert np.allclose(none[inside], 0.1 * (56 * gm + 21 * wm)[inside])


def test_spsolve_and_cg_agree():
    mask, gm, wm = _phantom((10, 8, 6))
    k = np.random.default_rng(0).uniform(0.5, 3.0, mask.shape)
    a = darcy_perfusion(mask, k, gm=gm, wm=wm, solver="spsolve")
    b = darcy_perfusion(mask, k, gm=gm, wm=wm, solver="cg")
    assert np.abs(a - b).max() < 1e-6


def test_operator_is_symmetric_positive_definite():
    mask, _, _ = _phantom((6, 5, 4))
    op = darcy_operator(mask, np.ones(mask.shape), 1.0, (1.0, 2.0, 1.5)).toarray()
    assert np.allclose(op, op.T)
    assert np.linalg.eigvalsh(op).min() > 0.99  # beta = 1 bounds it below


def test_label_territories():
    terr = np.array([0, 1, 2, 2]).reshape(4, 1, 1)
    scale = inflow_scale_map(terr, {1: 0.5, 2: 0.0}, terr.shape)
    assert scale.ravel().tolist() == [1.0, 0.5, 0.0, 0.0]


def test_bad_inputs():
    mask, gm, wm = _phantom((6, 5, 4))
    with pytest.raises(InputError, match="empty"):
        darcy_perfusion(np.zeros((4, 4, 4), bool))
    with pytest.raises(InputError, match="permeability"):
        darcy_perfusion(mask, -1.0)
    with pytest.raises(InputError, match="NaN"):
        darcy_perfusion(mask, np.full(mask.shape, np.nan))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        darcy_perfusion(mask, gm=gm * 2, wm=wm)
