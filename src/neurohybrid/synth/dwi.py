"""Diffusion MRI of a virtual subject, simulated with dipy from a plausible fibre field.

Fibre direction: the direction along which the subject's WM probability changes least, i.e. the
eigenvector of the smallest eigenvalue of the structure tensor (Gaussian-smoothed grad(w) grad(w)^T)
of the true WM map: WM tracts run along sheets and tubes of WM, not across them. Directions are
in the subject's voxel axes, the frame BIDS bvecs use.

Signal per voxel: partial-volume mixture of a WM tensor (eigenvalues 1.7, 0.3, 0.3 um^2/ms along
the fibre), isotropic GM (0.8 um^2/ms) and free water (3.0 um^2/ms), each predicted with
``dipy.reconst.dti.tensor_prediction`` (vectorised, unlike dipy.sims.voxel.multi_tensor which
loops over voxels in Python), then Rician noise with ``dipy.sims.voxel.add_noise`` (SNR 30 on
the b0 of WM). One b0 and 30 directions at b = 1000 s/mm^2 (dipy's charge dispersion).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neurohybrid.io import atomic_path
from neurohybrid.io.nifti import set_units
from neurohybrid.synth import bids
from neurohybrid.synth.anatomy import SubjectAnatomy

B_VALUE = 1000.0
N_DIRECTIONS = 30
SNR = 30.0
WM_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)
GM_MD = 0.8e-3
CSF_MD = 3.0e-3
S0_TISSUE = {"wm": 600.0, "gm": 800.0, "csf": 1500.0}


def gradient_directions(rng, n: int = N_DIRECTIONS) -> np.ndarray:
    from dipy.core.sphere import HemiSphere, disperse_charges

    xyz = rng.standard_normal((n, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    hemi, _ = disperse_charges(HemiSphere(xyz=xyz), 200)
    return hemi.vertices


def fibre_directions(wm: np.ndarray, voxel_mm: float, mask: np.ndarray, smooth_mm: float = 4.0) -> np.ndarray:
    """Unit fibre direction (N, 3) at the voxels of ``mask``: smallest-eigenvalue eigenvector of
    the WM structure tensor. Computed in the mask's bounding box (plus the filter support) only."""
    pad = int(np.ceil(3 * (smooth_mm + 1.0) / voxel_mm)) + 1
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    w = ndimage.gaussian_filter(wm[box].astype(np.float32), 1.0 / voxel_mm)
    grads = np.gradient(w)
    sigma = smooth_mm / voxel_mm
    inside = mask[box]
    tensor = np.empty((int(inside.sum()), 3, 3), dtype=np.float64)
    for a in range(3):
        for b in range(a, 3):
            tensor[:, a, b] = tensor[:, b, a] = ndimage.gaussian_filter(grads[a] * grads[b], sigma)[inside]
    _, vecs = np.linalg.eigh(tensor)
    return vecs[:, :, 0]


def simulate_dwi(anat: SubjectAnatomy, rng, *, n_directions: int = N_DIRECTIONS, md_scale: np.ndarray | None = None):
    """(data, bvals, bvecs, fibre directions). ``md_scale`` (subject grid): every compartment's
    diffusivity times this factor (1: healthy; below 1: the cytotoxic oedema of an acute infarct)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import tensor_prediction
    from dipy.sims.voxel import add_noise

    dirs = gradient_directions(rng, n_directions)
    bvals = np.concatenate([[0.0], np.full(len(dirs), B_VALUE)])
    bvecs = np.vstack([[0.0, 0.0, 0.0], dirs])
    gtab = gradient_table(bvals, bvecs=bvecs)
    inside = anat.brain
    e1 = fibre_directions(anat.wm, anat.voxel_mm, inside)
    # two unit vectors orthogonal to e1 complete the tensor's frame
    helper = np.where(np.abs(e1[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e2 = np.cross(e1, helper)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    e3 = np.cross(e1, e2)
    n = e1.shape[0]
    scale = np.ones(n) if md_scale is None else np.asarray(md_scale, float)[inside]
    params = np.empty((n, 12))
    params[:, :3] = np.asarray(WM_EVALS)[None, :] * scale[:, None]
    params[:, 3:] = np.stack([e1, e2, e3], axis=-1).reshape(n, 9)  # columns are eigenvectors (dipy)
    iso = lambda md: np.exp(-bvals[None, :] * md * scale[:, None])  # noqa: E731
    wm, gm, csf = anat.wm[inside], anat.gm[inside], anat.csf[inside]
    signal = (S0_TISSUE["wm"] * wm[:, None] * tensor_prediction(params, gtab, 1.0)
              + S0_TISSUE["gm"] * gm[:, None] * iso(GM_MD)
              + S0_TISSUE["csf"] * csf[:, None] * iso(CSF_MD))
    signal = add_noise(signal, SNR, S0_TISSUE["wm"], noise_type="rician", rng=rng)
    data = np.zeros(anat.shape + (len(bvals),), dtype=np.float32)
    data[inside] = signal
    return data, bvals, bvecs, e1


def write_dwi(subject: str, session: str, anat: SubjectAnatomy, rng, bids_root, truth_dir, *,
              n_directions: int = N_DIRECTIONS, md_scale: np.ndarray | None = None) -> dict:
    import nibabel as nib

    data, bvals, bvecs, _ = simulate_dwi(anat, rng, n_directions=n_directions, md_scale=md_scale)
    path = bids.session_path(bids_root, subject, session, "dwi", "dwi")
    img = nib.Nifti1Image(np.clip(np.rint(data), 0, 32767).astype(np.int16), anat.affine)
    img.set_qform(anat.affine, code=1)
    img.set_sform(anat.affine, code=1)
    set_units(img)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    stem = path.name.replace(".nii.gz", "")
    with atomic_path(path.with_name(stem + ".bval")) as tmp:
        tmp.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    with atomic_path(path.with_name(stem + ".bvec")) as tmp:
        tmp.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs.T) + "\n")
    bids.write_json_sidecar(path, bids.anat_sidecar("dwi", {"PhaseEncodingDirection": "j-",
                                                           "TotalReadoutTime": 0.05}))
    return {"b_value": B_VALUE, "n_directions": int(len(bvals) - 1), "snr": SNR, "wm_evals": list(WM_EVALS)}
