"""Mass effect of a growing tumour: the surrounding tissue pushed aside by a smooth radial
diffeomorphism whose size follows the tumour's volume.

The tumour grows on the patient's undisplaced anatomy (what the hidden-mechanism generator
integrates); what the scanner sees at a session is that anatomy, tumour included, displaced by

    phi = exp(v),   v(x) = A w(x) g(r / sigma) (x - c) / r,   g(s) = s exp((1 - s^2) / 2),

a stationary velocity field integrated by scaling and squaring (``warp.integrate_velocity``, the
construction of the subject warps), so phi is a diffeomorphism; the Jacobian determinant is
checked, not assumed. c is the tumour's density-weighted centre; g peaks (1) at r = sigma and
decays like a Gaussian beyond it; it is linear at the centre, so v is smooth there. The size
follows the tumour: R = (3 V / 4 pi)^(1/3) with V = integral of u (the tumour's cell volume, ml),
sigma = R + SPREAD_MM, and A such that the tumour's centre is inflated by 1 + f (f drawn per
patient in FRACTION_RANGE: the push adds that fraction of the tumour's own volume; capped at
MAX_PUSH_MM). w(x) is 0 outside
the brain and rises smoothly to 1 within WALL_MM of its edge: the skull does not move, the brain
near it is compressed. An image of the displaced brain is the undisplaced one pulled back through
phi^-1 = exp(-v).

FRACTION_RANGE, SPREAD_MM, WALL_MM and MAX_PUSH_MM are our choices (pushes of a few millimetres,
up to a centimetre for the largest tumours), not fitted to patient data.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neurohybrid.synth.warp import integrate_velocity, jacobian_determinant, upsample_linear

FRACTION_RANGE = (0.2, 0.6)  # volume the push adds at the tumour, as a fraction of its own (uniform per patient)
SPREAD_MM = 10.0          # sigma - R: how far beyond the tumour's radius the push peaks
WALL_MM = 20.0            # the brain's edge: the velocity falls to 0 over this depth
MAX_PUSH_MM = 10.0        # cap of the peak velocity A (large tumours: the compression stays fold-free)
CONTROL_MM = 4.0          # the velocity is integrated on a grid of this spacing, then interpolated


def tumour_size(u: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, float]:
    """(density-weighted centre in voxel indices, equivalent radius R in mm of the cell volume)."""
    mass = float(u.sum())
    if mass <= 0:
        return np.zeros(3), 0.0
    centre = np.array(ndimage.center_of_mass(u))
    volume_mm3 = mass * voxel_mm**3
    return centre, float((3.0 * volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0))


def peak_velocity(radius_mm: float, fraction: float) -> float:
    """A such that the flow inflates the tumour's centre by the factor 1 + fraction: there v is
    linear with divergence 3 A e^(1/2) / sigma, and the time-1 flow's Jacobian is its exponential."""
    return min((radius_mm + SPREAD_MM) * np.log1p(fraction) / (3.0 * np.exp(0.5)), MAX_PUSH_MM)


def velocity_field(shape, voxel_mm: float, centre_vox, radius_mm: float, fraction: float, brain: np.ndarray,
                   spacing_mm: float) -> np.ndarray:
    """v (mm, shape + (3,)) sampled every ``spacing_mm`` on the image grid's axes (``shape`` is that
    control grid's), for the tumour at ``centre_vox`` (image voxel indices)."""
    step = spacing_mm / voxel_mm
    pos = np.moveaxis(np.indices(shape, dtype=np.float64), 0, -1) * step  # image voxel index of each node
    rel = (pos - np.asarray(centre_vox, float)) * voxel_mm  # mm
    r = np.sqrt((rel**2).sum(-1))
    sigma = radius_mm + SPREAD_MM
    s = r / sigma
    # g(s) / r = exp((1 - s^2) / 2) / sigma: no division by r (smooth at the centre)
    speed = peak_velocity(radius_mm, fraction) * np.exp((1.0 - s**2) / 2.0) / sigma
    depth = ndimage.distance_transform_edt(brain, sampling=(voxel_mm,) * 3)
    wall = np.clip(depth / WALL_MM, 0.0, 1.0)
    wall = wall * wall * (3.0 - 2.0 * wall)  # smoothstep: no kink where the push starts or ends
    wall = ndimage.map_coordinates(wall, np.moveaxis(pos, -1, 0), order=1, mode="nearest")
    return rel * (speed * wall)[..., None]


def displacement(u: np.ndarray, brain: np.ndarray, voxel_mm: float, fraction: float,
                 spacing_mm: float = CONTROL_MM) -> tuple[np.ndarray, dict]:
    """Pull-back displacement d (voxel units, shape + (3,)): the displaced image at voxel x shows the
    undisplaced anatomy at x + d(x) (phi^-1 = exp(-v)); and its record (centre, R, peak |d| in mm,
    Jacobian range of the forward map). Zero when there is no tumour."""
    shape = u.shape
    centre, radius = tumour_size(u, voxel_mm)
    info = {"volume_fraction": float(fraction), "equivalent_radius_mm": radius, "centre_voxel": [float(c) for c in centre]}
    if radius <= 0:
        return np.zeros(shape + (3,)), dict(info, max_displacement_mm=0.0, jacobian_min=1.0, jacobian_max=1.0)
    step = spacing_mm / voxel_mm
    control = tuple(int(np.ceil((n - 1) / step)) + 2 for n in shape)
    v_mm = velocity_field(control, voxel_mm, centre, radius, fraction, brain, spacing_mm)
    fields = {}
    for sign in (1.0, -1.0):
        d_ctrl = integrate_velocity(sign * v_mm / spacing_mm) * spacing_mm  # mm on the control grid
        fields[sign] = np.stack([upsample_linear(d_ctrl[..., c], shape, 1.0 / step) for c in range(3)], -1)
    jac = jacobian_determinant(fields[1.0], voxel_mm)
    info.update(max_displacement_mm=float(np.sqrt((fields[1.0] ** 2).sum(-1)).max()),
                jacobian_min=float(jac.min()), jacobian_max=float(jac.max()))
    if info["jacobian_min"] <= 0:
        raise RuntimeError(f"mass effect folded (min Jacobian {info['jacobian_min']:.3g}): lower the fraction")
    return fields[-1.0] / voxel_mm, info


def pull_back(data: np.ndarray, disp_vox: np.ndarray, order: int = 1) -> np.ndarray:
    """data (undisplaced) seen through the displacement: out[x] = data[x + d(x)]; order 0 for labels."""
    coords = np.indices(data.shape, dtype=np.float64) + np.moveaxis(disp_vox, -1, 0)
    if order == 0:
        return ndimage.map_coordinates(data, coords, order=0, mode="nearest").astype(data.dtype)
    return ndimage.map_coordinates(np.asarray(data, np.float64), coords, order=1, mode="nearest")


def displaced_anatomy(anat, disp_vox: np.ndarray):
    """The anatomy as the displaced image shows it: tissue maps and T1w pulled back (trilinear),
    brain, DK labels and cerebellum (nearest), and the truth template -> subject warp composed with
    the displacement (the template point seen at x is the one the undisplaced anatomy had at
    x + d(x))."""
    import dataclasses

    warp = anat.warp
    a3 = warp.template_affine[:3, :3]
    nonrigid = np.stack([pull_back(warp.nonrigid_mm[..., c], disp_vox) for c in range(3)], -1) + disp_vox @ a3.T
    warp = dataclasses.replace(warp, nonrigid_mm=nonrigid)
    return dataclasses.replace(
        anat, warp=warp, t1=pull_back(anat.t1, disp_vox), gm=np.clip(pull_back(anat.gm, disp_vox), 0, 1),
        wm=np.clip(pull_back(anat.wm, disp_vox), 0, 1), csf=np.clip(pull_back(anat.csf, disp_vox), 0, 1),
        brain=pull_back(anat.brain, disp_vox, 0), atlas=pull_back(anat.atlas, disp_vox, 0),
        cerebellum=pull_back(anat.cerebellum, disp_vox, 0))
