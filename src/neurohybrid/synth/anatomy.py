"""Virtual subject anatomy: the MNI152 2009c template pulled through a random diffeomorphic warp,
with a rigid head pose, the acquisition's point spread, a smooth multiplicative bias field and
Rician noise on the images.

Everything the disease generators need (true GM/WM/CSF probabilities, brain mask, DK labels,
template coordinates of each voxel) is kept on the subject grid, so tumours grow, tau is painted
and perfusion is solved in subject space, as a real scan would show them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from neurohybrid.anatomy.atlas import cerebellar_reference_mask, load_dk_atlas
from neurohybrid.anatomy.templates import load_template
from neurohybrid.synth.warp import PointSampler, SubjectWarp, random_subject_warp, upsample_linear

# T1w contrast of the nilearn template (WM ~ 180, GM ~ 170 inside the brain; skull and scalp kept)
NOISE_FRACTION = (0.015, 0.03)  # Rician sigma as a fraction of the WM intensity
BIAS_AMPLITUDE = (0.05, 0.15)   # peak |log bias|
# MR point spread, Gaussian, FWHM in voxels (uniform per image): a fully sampled, unfiltered
# Cartesian acquisition has a sinc PSF of FWHM ~1.2 voxels; partial Fourier or k-space filtering
# widens it. The template the images start from is itself smooth, so the images are somewhat
# blurrier than a scan at this voxel size would be
MR_PSF_FWHM_VOXELS = (1.0, 1.4)


@functools.lru_cache(maxsize=4)
def template_set(voxel_mm: float) -> dict:
    """Template images at voxel_mm that every subject is built from (cached per process)."""
    atlas, regions = load_dk_atlas(voxel_mm=voxel_mm)
    return {
        "t1": load_template("t1", voxel_mm),
        "gm": load_template("gm", voxel_mm),
        "wm": load_template("wm", voxel_mm),
        "csf": load_template("csf", voxel_mm),
        "brain": load_template("brain", voxel_mm),
        "atlas": atlas,
        "regions": regions,
        "cerebellum": cerebellar_reference_mask(voxel_mm),
    }


@dataclass
class SubjectAnatomy:
    subject: str
    voxel_mm: float
    warp: SubjectWarp
    t1: np.ndarray          # noise-free T1w intensity (template contrast), subject grid
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray       # bool
    atlas: np.ndarray       # int16 DK labels
    cerebellum: np.ndarray  # bool, cerebellar GM reference region
    regions: object         # DK region table
    params: dict = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.warp.subject_affine

    @property
    def shape(self):
        return self.t1.shape

    def template_points(self) -> np.ndarray:
        return self.warp.template_points()


def smooth_random_field(shape, voxel_mm, rng, smooth_mm=40.0) -> np.ndarray:
    """Zero-mean smooth random field with max |f| = 1 (built on a coarse grid, then upsampled)."""
    coarse = tuple(int(np.ceil(s * voxel_mm / 8.0)) + 2 for s in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse), smooth_mm / 8.0, mode="reflect")
    f -= f.mean()
    f /= max(np.abs(f).max(), 1e-12)
    return upsample_linear(f, shape, voxel_mm / 8.0)


def make_subject_anatomy(subject: str, voxel_mm: float, rng) -> SubjectAnatomy:
    tpl = template_set(float(voxel_mm))
    max_disp = float(rng.uniform(3.0, 6.0))
    warp = random_subject_warp(tpl["t1"].affine, tpl["t1"].shape, rng, max_displacement_mm=max_disp)
    sampler = PointSampler(tpl["t1"].affine, warp.template_points())  # all template images share this grid
    get = lambda key, order: sampler.sample(tpl[key].dataobj, order=order)  # noqa: E731
    gm = np.clip(get("gm", 1), 0, 1)
    wm = np.clip(get("wm", 1), 0, 1)
    csf = np.clip(get("csf", 1), 0, 1)
    anat = SubjectAnatomy(
        subject=subject,
        voxel_mm=float(voxel_mm),
        warp=warp,
        t1=get("t1", 1),
        gm=gm,
        wm=wm,
        csf=csf,
        brain=get("brain", 0) > 0,
        atlas=get("atlas", 0).astype(np.int16),
        cerebellum=get("cerebellum", 0) > 0,
        regions=tpl["regions"],
        params={
            "max_velocity_mm": max_disp,
            "warp_jacobian_min": warp.jacobian_min,
            "warp_jacobian_max": warp.jacobian_max,
            "max_displacement_mm": float(np.sqrt((warp.nonrigid_mm**2).sum(-1)).max()),
            "pose_matrix": warp.pose,
        },
    )
    return anat


def observe_image(clean: np.ndarray, anat: SubjectAnatomy, rng, *, reference_intensity: float,
                  bias: np.ndarray | None = None, noise_fraction: float | None = None) -> tuple[np.ndarray, dict]:
    """Scanner model: point spread (Gaussian), multiplicative smooth bias field, then Rician noise
    (magnitude of complex Gaussian)."""
    fwhm_vox = float(rng.uniform(*MR_PSF_FWHM_VOXELS))
    # in Fourier space: a sampled Gaussian kernel this narrow (sigma ~0.5 voxel) is 10 % narrower
    # than its nominal width, the exact transfer function is not
    sigma_vox = fwhm_vox / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    clean = np.fft.ifftn(ndimage.fourier_gaussian(np.fft.fftn(np.asarray(clean, np.float64)), sigma_vox)).real
    if bias is None:
        amp = float(rng.uniform(*BIAS_AMPLITUDE))
        bias = np.exp(amp * smooth_random_field(clean.shape, anat.voxel_mm, rng))
    if noise_fraction is None:
        noise_fraction = float(rng.uniform(*NOISE_FRACTION))
    sigma = noise_fraction * reference_intensity
    real = clean * bias + rng.normal(0.0, sigma, clean.shape)
    imag = rng.normal(0.0, sigma, clean.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32), {"noise_sigma": sigma, "bias_log_peak": float(np.abs(np.log(bias)).max()),
                                                            "psf_fwhm_mm": fwhm_vox * anat.voxel_mm}


def flair_image(anat: SubjectAnatomy, hyperintensity: np.ndarray, reference_intensity: float) -> np.ndarray:
    """Noise-free FLAIR: tissue contrast (WM 0.55, GM 0.75, CSF 0.08 of the WM T1w intensity) plus
    ``hyperintensity`` (same units: oedema, infarct) inside the brain; outside it 0.35 x the T1w."""
    tissue = 0.55 * anat.wm + 0.75 * anat.gm + 0.08 * anat.csf
    ref = reference_intensity
    return ref * np.where(anat.brain, tissue + hyperintensity, 0.35 * anat.t1 / ref)


def wm_reference(anat: SubjectAnatomy) -> float:
    sel = anat.wm > 0.9
    return float(np.median(anat.t1[sel])) if sel.any() else float(anat.t1.max())
