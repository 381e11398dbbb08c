import nibabel as nib
import numpy as np

from neurohybrid.synth.warp import (integrate_velocity, jacobian_determinant, random_subject_warp, rigid_matrix,
                                    warp_to_subject, _compose_displacement)


def test_constant_velocity_integrates_to_translation():
    v = np.zeros((8, 9, 10, 3))
    v[..., 0], v[..., 2] = 0.7, -0.3
    disp = integrate_velocity(v)
    np.testing.assert_allclose(disp[2:-2, 2:-2, 2:-2], v[2:-2, 2:-2, 2:-2], atol=1e-12)


def test_exp_of_minus_v_inverts_exp_of_v():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    v = np.stack([ndimage.gaussian_filter(rng.standard_normal((24, 24, 24)), 3.0) for _ in range(3)], -1)
    v *= 2.0 / np.abs(v).max()  # up to 2 voxels
    fwd, bwd = integrate_velocity(v), integrate_velocity(-v)
    roundtrip = _compose_displacement(bwd, fwd)  # x -> x + fwd -> ... + bwd
    inner = (slice(4, -4),) * 3
    assert np.abs(roundtrip[inner]).max() < 0.05 * np.abs(fwd[inner]).max()
    assert np.abs(fwd).max() > 0.5


def test_random_warp_is_diffeomorphic_and_bounded():
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = (-98, -134, -72)
    warp = random_subject_warp(affine, (50, 59, 48), np.random.default_rng(1), max_displacement_mm=6.0)
    jac = jacobian_determinant(warp.nonrigid_mm, 4.0)
    assert jac.min() > 0 and warp.jacobian_min == jac.min()
    disp = np.sqrt((warp.nonrigid_mm**2).sum(-1))
    assert 1.0 < disp.max() <= 6.5
    rot = warp.pose[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    angle = np.degrees(np.arccos((np.trace(rot) - 1) / 2))
    assert 0 < angle < 7.0


def test_jacobian_of_known_affine_map():
    x = np.indices((10, 10, 10), dtype=float).transpose(1, 2, 3, 0) * 2.0
    disp = x @ np.diag([0.1, -0.2, 0.3]).T  # u = A x: J = det(I + A)
    np.testing.assert_allclose(jacobian_determinant(disp, 2.0), 1.1 * 0.8 * 1.3, rtol=1e-12)


def test_rigid_matrix_fixes_its_centre():
    m = rigid_matrix(np.radians([3, -2, 4]), [0, 0, 0], centre_mm=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(m @ [1, 2, 3, 1], [1, 2, 3, 1], atol=1e-12)


def test_warp_to_subject_follows_the_field():
    # template: a ramp in x (value = world x); a field shifting by +3 mm in x must read x + 3
    aff = np.eye(4)
    aff[:3, 3] = -10
    xs = np.arange(20) - 10.0
    tpl = nib.Nifti1Image(np.broadcast_to(xs[:, None, None], (20, 20, 20)).astype(np.float32), aff)
    field = np.zeros((20, 20, 20, 3), np.float32)
    field[..., 0] = 3.0
    out = warp_to_subject(tpl, nib.Nifti1Image(field, aff), order=1).get_fdata()
    np.testing.assert_allclose(out[2:15, 5, 5], xs[2:15] + 3.0, atol=1e-6)


def test_separable_upsampling_equals_trilinear_interpolation():
    from scipy import ndimage

    from neurohybrid.synth.warp import upsample_linear

    coarse = np.random.default_rng(0).standard_normal((7, 8, 6))
    shape, step = (25, 29, 20), 0.25
    ref = ndimage.map_coordinates(coarse, np.indices(shape) * step, order=1, mode="nearest")
    np.testing.assert_allclose(upsample_linear(coarse, shape, step), ref, atol=1e-12)
