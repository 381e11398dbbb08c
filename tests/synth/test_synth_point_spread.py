"""The scanner models blur what they image by a point spread drawn from a documented range."""

from __future__ import annotations

import types

import numpy as np
import pytest

from neurohybrid.synth import alzheimer
from neurohybrid.synth.anatomy import MR_PSF_FWHM_VOXELS, observe_image

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _fwhm_vox(img: np.ndarray, freq: float) -> float:
    """FWHM (voxels) of a Gaussian PSF from how much it damped a cosine of `freq` cycles per voxel
    along the first axis: its transfer function is exp(-2 pi^2 sigma^2 f^2)."""
    n = img.shape[0]
    spectrum = np.abs(np.fft.rfft(img.mean(axis=(1, 2)) - img.mean()))
    damping = spectrum[int(round(freq * n))] / (n / 2)
    return float(np.sqrt(-np.log(damping) / (2 * np.pi**2 * freq**2))) * FWHM_PER_SIGMA


def test_mr_images_are_blurred_by_a_seeded_psf_within_its_range():
    shape, freq = (32, 8, 8), 0.25
    anat = types.SimpleNamespace(voxel_mm=2.0, shape=shape)
    x = np.arange(shape[0])[:, None, None] * np.ones(shape)
    pattern = 2.0 + np.cos(2 * np.pi * freq * x)  # positive: the magnitude image keeps its sign
    widths = []
    for seed in range(6):
        img, info = observe_image(pattern, anat, np.random.default_rng(seed), reference_intensity=1.0,
                                  bias=np.ones(shape), noise_fraction=0.0)
        widths.append(_fwhm_vox(img, freq))
        assert info["psf_fwhm_mm"] == pytest.approx(widths[-1] * anat.voxel_mm, rel=1e-3)
    assert MR_PSF_FWHM_VOXELS[0] <= min(widths) and max(widths) <= MR_PSF_FWHM_VOXELS[1]
    assert max(widths) - min(widths) > 0.05  # drawn per image, not fixed
    again, _ = observe_image(pattern, anat, np.random.default_rng(0), reference_intensity=1.0, bias=np.ones(shape),
                             noise_fraction=0.0)
    assert _fwhm_vox(again, freq) == pytest.approx(widths[0])  # seeded


def test_pet_psf_is_drawn_per_patient_from_its_range():
    fwhms = [alzheimer.draw_parameters(np.random.default_rng(s))["pet_psf_fwhm_mm"] for s in range(20)]
    lo, hi = alzheimer.PET_PSF_FWHM_MM
    assert lo <= min(fwhms) and max(fwhms) <= hi and max(fwhms) - min(fwhms) > 1.0


def test_a_wider_pet_psf_blurs_the_regional_contrast():
    from neurohybrid.synth.anatomy import make_subject_anatomy

    anat = make_subject_anatomy("psf", 4.0, np.random.default_rng(1))
    names = [n for n in anat.regions["name"] if "entorhinal" in n]
    suvr = {n: 3.0 for n in names}  # hot entorhinal cortex, everything else 1-ish
    hot = np.isin(alzheimer.cortical_label_field(anat), anat.regions.set_index("name").loc[names, "id"].to_numpy())
    peak = [alzheimer.pet_image(anat, suvr, np.random.default_rng(0), fwhm)[hot].mean() for fwhm in (4.0, 8.0)]
    assert peak[1] < peak[0] - 0.1  # partial volume: the wider PSF spreads the hot region out
