"""Within-subject alignment (antspyx, rigid, mutual information): every session's images onto the
subject's reference T1w (the first session's, the one ``preprocess anat`` processes).

Real longitudinal data is not co-registered: the head sits in a new pose at every visit, and within
a visit FLAIR, contrast T1w, PET, perfusion and DWI come on their own grids (voxel size, field of
view, orientation, datatype, scale factor) and the head may move between them. Here

1. each later session's T1w is registered rigidly to the reference T1w;
2. each other image of a session (FLAIR, ce-T1w, PET, CBF, DWI mean b0) is registered rigidly to
   its session's T1w (to the reference T1w when the session has none, e.g. Alzheimer's PET-only
   follow-ups);
3. the two are composed into one affine per image, ``from-<suffix>_to-T1w``, mapping reference-T1w
   points to image points (ANTs convention: ``ants.apply_transforms(fixed=<T1w grid>,
   moving=<image>, transformlist=[xfm])`` resamples the image onto the reference T1w; chained after
   ``from-T1w_to-MNI...`` it goes straight to the template in one interpolation).

Metric: Mattes mutual information (32 bins) in every case, also T1w to T1w (scanner intensity
scales differ between visits). Start: centres of mass aligned (antspyx default), which also
leaves an already aligned pair where it is up to the optimiser's convergence: the test checks that
such pairs move less than a voxel. Transforms are saved under BIDS-Derivatives names, one JSON
sidecar each (the two rigid steps, metric, schedule).

Lesion masks (``derivatives/lesions``) carry no image of their own: ``mask_transform`` finds the
image they were drawn on from their grid (shape + affine), the ``space-`` entity breaking ties or
naming the image when the grid is another one, and their data then go through that image's
transform (see ``pipeline.run_lesions``: resampled once, linear + 0.5 threshold).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from neurohybrid.errors import InputError
from neurohybrid.io import load_image, write_json
from neurohybrid.preprocessing import layout

log = logging.getLogger(__name__)

ALIGN_SEED = 20261130


@dataclasses.dataclass(frozen=True)
class RigidSchedule:
    iterations: tuple[int, ...]
    level_mm: tuple[float, ...]  # resolution of each level; the shrink factor follows from the voxel size
    sampling_rate: float

    def levels(self, voxel_mm: float) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(iterations, shrink factors, smoothing sigmas in voxels) for a fixed image of voxel_mm:
        levels coarser than the image only; a level that would repeat the previous shrink is merged."""
        its, shrinks = [], []
        for n, mm in zip(self.iterations, self.level_mm):
            shrink = max(1, int(round(mm / voxel_mm)))
            if shrinks and shrinks[-1] == shrink:
                its[-1] += n
                continue
            its.append(n)
            shrinks.append(shrink)
        sigmas = [int(np.log2(f)) for f in shrinks]  # 4 -> 2, 2 -> 1, 1 -> 0 voxels (ANTs' usual pairing)
        return tuple(its), tuple(shrinks), tuple(sigmas)


# A rigid fit has 6 parameters: levels at 8 and 4 mm put it well within a 2 mm voxel (measured on
# the demo: < 1 mm on already aligned pairs), so FAST (tests, --fast, the demo) stops there; FULL
# refines at 2 and 1 mm.
FULL = RigidSchedule((1000, 500, 250, 100), (8.0, 4.0, 2.0, 1.0), 0.25)
FAST = RigidSchedule((100, 50), (8.0, 4.0), 0.1)


@dataclasses.dataclass(frozen=True)
class Image:
    """One raw image of a session to align: ``suffix`` is the BIDS suffix used as ``from-`` label."""

    path: Path
    suffix: str
    datatype: str

    @property
    def entities(self) -> str:
        """The file name's entities without the suffix (``sub-X_ses-Y_trc-AV1451``)."""
        name = self.path.name.removesuffix(".nii.gz").removesuffix(".nii")
        return name[: -(len(self.suffix) + 1)]


def session_images(bids: Path, sub: str, ses: str) -> dict[str, Image]:
    """The images of a session, keyed by their from- label (T1w, FLAIR, ce<agent>T1w, pet<tracer>, cbf, dwi)."""
    base = Path(bids) / f"sub-{sub}" / f"ses-{ses}"
    found: dict[str, Image] = {}
    t1 = layout.raw_t1w(bids, sub, ses)
    if t1.exists():
        found["T1w"] = Image(t1, "T1w", "anat")
    flair = base / "anat" / f"sub-{sub}_ses-{ses}_FLAIR.nii.gz"
    if flair.exists():
        found["FLAIR"] = Image(flair, "FLAIR", "anat")
    for p in sorted((base / "anat").glob(f"sub-{sub}_ses-{ses}_ce-*_T1w.nii.gz")):
        agent = re.search(r"_ce-([A-Za-z0-9]+)_", p.name).group(1)
        found[f"ce{agent}T1w"] = Image(p, "T1w", "anat")
    for p in layout.raw_pet(bids, sub, ses):
        tracer = re.search(r"_trc-([A-Za-z0-9]+)_", p.name).group(1)
        found[f"pet{tracer}"] = Image(p, "pet", "pet")
    cbf = layout.raw_cbf(bids, sub, ses)
    if cbf.exists():
        found["cbf"] = Image(cbf, "cbf", "perf")
    dwi = layout.raw_dwi(bids, sub, ses)
    if dwi:
        found["dwi"] = Image(dwi[0], "dwi", "dwi")
    return found


def reference_session(bids: Path, sub: str) -> str:
    return layout.sessions(bids, sub)[0]


def transform_path(out: Path, sub: str, ses: str, image: Image) -> Path:
    """``<out>/sub-X/ses-Y/<datatype>/<entities>_from-<suffix>_to-T1w_mode-image_xfm.mat``; the
    session's own T1w is ``sub-X_ses-Y_from-T1w_to-T1w`` (session T1w -> the subject's T1w)."""
    return (Path(out) / f"sub-{sub}" / f"ses-{ses}" / image.datatype
            / f"{image.entities}_from-{image.suffix}_to-T1w_mode-image_xfm.mat")


def qc_path(out: Path, sub: str, ses: str) -> Path:
    return align_figures_dir(out, sub) / f"sub-{sub}_ses-{ses}_desc-align_qc.png"


def align_figures_dir(out: Path, sub: str) -> Path:
    return Path(out) / f"sub-{sub}" / "figures" / "align"


# --------------------------------------------------------------------------- affine helpers

def _to_matrix(tx) -> np.ndarray:
    """An ANTs linear transform as a 4x4 matrix acting on LPS points (whatever its parametrisation)."""
    origin = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)))
    cols = [np.asarray(tx.apply_to_point(tuple(e))) - origin for e in np.eye(3)]
    m = np.eye(4)
    m[:3, :3] = np.stack(cols, axis=1)
    m[:3, 3] = origin
    return m


def read_matrix(path: Path) -> np.ndarray:
    import ants

    return _to_matrix(ants.read_transform(str(path)))


def write_matrix(matrix: np.ndarray, path: Path) -> None:
    import ants

    from neurohybrid.io import atomic_path

    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="float", dimension=3,
                                    matrix=np.asarray(matrix[:3, :3], float), translation=np.asarray(matrix[:3, 3], float),
                                    center=np.zeros(3))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ants.write_transform(tx, str(tmp) + ".mat")
        Path(str(tmp) + ".mat").replace(tmp)


def max_displacement_mm(matrix: np.ndarray, img: nib.Nifti1Image) -> float:
    """Largest displacement the affine causes over the image's field of view (its 8 corners: for an
    affine map the maximum over a box is at a corner)."""
    shape = np.asarray(img.shape[:3]) - 1
    corners = np.array([[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float)
    world = nib.affines.apply_affine(img.affine, corners) * np.array([-1, -1, 1])  # RAS -> LPS
    moved = world @ matrix[:3, :3].T + matrix[:3, 3]
    return float(np.linalg.norm(moved - world, axis=1).max())


# --------------------------------------------------------------------------- registration

def _load_3d(image: Image, sub: str) -> nib.Nifti1Image:
    """The image as float32 3D: DWI becomes the mean of its b0 volumes (the anatomical contrast)."""
    if image.suffix == "dwi":
        img = load_image(image.path, subject=sub, ndim=4)
        bval = Path(str(image.path).removesuffix(".nii.gz") + ".bval")
        bvals = np.loadtxt(bval, ndmin=1)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if bvals.size != data.shape[3]:
            raise InputError(f"{bvals.size} b-values for {data.shape[3]} DWI volumes", file=bval, subject=sub)
        b0 = bvals <= 50  # b=0 with the usual tolerance of scanners that report b=5..50
        return nib.Nifti1Image(data[..., b0 if b0.any() else slice(None)].mean(axis=3), img.affine)
    img = load_image(image.path, subject=sub, ndim=3)
    data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter (scaled int16)
    if not np.nanmax(data) > 0:
        raise InputError("image has no positive intensities: nothing to register", file=image.path, subject=sub)
    return nib.Nifti1Image(data, img.affine)


def rigid(fixed, moving, *, sched: RigidSchedule, outprefix: str) -> np.ndarray:
    """Rigid moving -> fixed (Mattes MI); returns the 4x4 LPS point map fixed -> moving."""
    import ants

    ants.config._random_seed = ALIGN_SEED  # fixed seed for the metric's random sampling (see ants_backend)
    its, shrinks, sigmas = sched.levels(float(min(fixed.spacing)))
    reg = ants.registration(fixed, moving, type_of_transform="Rigid", aff_metric="mattes", aff_sampling=32,
                            aff_random_sampling_rate=sched.sampling_rate, aff_iterations=its,
                            aff_shrink_factors=shrinks, aff_smoothing_sigmas=sigmas, outprefix=outprefix)
    return read_matrix(reg["fwdtransforms"][0])


def run_align(bids, subject, out, *, fast=False, backend="ants", threads=None) -> dict:
    """Register every session's images to the reference T1w; write transforms, sidecars, QC figures.

    Returns seconds per registration, keyed ``ses/label``.
    """
    from neurohybrid.preprocessing import ants_backend as ab
    from neurohybrid.preprocessing.qc import align_qc_figure

    bids, out = Path(bids), Path(out)
    sub = layout.subject_label(subject)
    ab.set_threads(threads)
    sched = FAST if fast else FULL
    ref_ses = reference_session(bids, sub)
    ref_path = layout.raw_t1w(bids, sub, ref_ses)
    if not ref_path.exists():
        raise InputError("missing modality: T1w image of the first session not found", file=ref_path, subject=sub)
    ref_img = _load_3d(Image(ref_path, "T1w", "anat"), sub)
    a_ref = ab.to_ants(ref_img)
    times: dict[str, float] = {}
    figures = []
    far: list[tuple[Path, float]] = []
    with tempfile.TemporaryDirectory(prefix=f"nh-align-{sub}-") as work:
        for ses in layout.sessions(bids, sub):
            images = session_images(bids, sub, ses)
            if not images:
                continue
            # session T1w -> reference T1w (identity for the reference session itself)
            ses_to_ref = np.eye(4)
            a_ses_t1 = a_ref
            if "T1w" in images and ses != ref_ses:
                t = time.perf_counter()
                ses_img = _load_3d(images["T1w"], sub)
                a_ses_t1 = ab.to_ants(ses_img)
                ses_to_ref = rigid(a_ref, a_ses_t1, sched=sched, outprefix=f"{work}/{ses}_T1w_")
                times[f"{ses}/T1w"] = time.perf_counter() - t
            composed = {}
            for label, image in images.items():
                if label == "T1w":
                    step = np.eye(4)
                else:
                    t = time.perf_counter()
                    img = _load_3d(image, sub)
                    step = rigid(a_ses_t1, ab.to_ants(img), sched=sched, outprefix=f"{work}/{ses}_{label}_")
                    times[f"{ses}/{label}"] = time.perf_counter() - t
                if label == "T1w" and ses == ref_ses:
                    continue  # the reference itself: no transform
                # points: reference T1w -> session T1w (ses_to_ref maps reference points into the
                # session T1w) -> image (step maps session-T1w points into the image)
                matrix = step @ ses_to_ref
                path = transform_path(out, sub, ses, image)
                write_matrix(matrix, path)
                write_json(path.with_suffix(".json"), {
                    "Software": "ANTs (antspyx)", "Type": "rigid (composed)",
                    "Description": f"maps points of the subject's T1w (ses-{ref_ses}) to {image.path.name}; "
                                   "ants.apply_transforms(fixed=T1w, moving=image, [this]) resamples the image "
                                   "onto the T1w",
                    "Sources": [f"bids:raw:{image.path.relative_to(bids)}"],
                    "Reference": f"bids:raw:{ref_path.relative_to(bids)}",
                    "Steps": {"image_to_session_T1w": step.tolist(), "session_T1w_to_T1w": ses_to_ref.tolist()},
                    "Metric": "Mattes mutual information, 32 bins", "Schedule": dataclasses.asdict(sched),
                    "Seed": ALIGN_SEED,
                })
                composed[label] = path
                if backend == "fsl":
                    far.append((image.path, max_displacement_mm(matrix, ref_img)))
            figures.append(align_qc_figure(qc_path(out, sub, ses), a_ref, images, composed, sub=sub, ses=ses,
                                           lesions=layout.raw_lesions(bids, sub, ses),
                                           resolve=lambda m, s=ses, i=images: mask_transform(bids, out, sub, s, m, i),
                                           load=lambda im: _load_3d(im, sub)))
    if backend == "fsl":
        _refuse_unaligned_for_fsl(bids, sub, ref_img, far)
    align_figures_dir(out, sub).mkdir(parents=True, exist_ok=True)
    layout.write_dataset_description(out)
    log.info("sub-%s rigid registrations (s): %s", sub, times)
    return times


def _refuse_unaligned_for_fsl(bids, sub, ref_img, moves) -> None:
    """The FSL backend resamples with FSL's voxel-grid matrices from the T1w only: it needs every
    image on the reference T1w grid and in register with it."""
    vox = float(min(nib.affines.voxel_sizes(ref_img.affine)))
    for path, mm in moves:
        img = nib.load(str(path))
        if img.shape[:3] != ref_img.shape or not np.allclose(img.affine, ref_img.affine, atol=1e-3):
            raise InputError("the FSL backend needs every image on the first session's T1w grid; this one is on "
                             "its own grid (use preprocessing.backend: ants, which aligns images on any grid)",
                             file=path, subject=sub)
        if mm > vox:
            raise InputError(f"the FSL backend needs co-registered sessions; this image is {mm:.1f} mm out of "
                             "register with the first session's T1w (use preprocessing.backend: ants, which "
                             "aligns it)", file=path, subject=sub)


# --------------------------------------------------------------------------- consumers

def _grid_equal(a: nib.Nifti1Image, b_shape, b_affine) -> bool:
    return tuple(a.shape[:3]) == tuple(b_shape[:3]) and np.allclose(a.affine, b_affine, atol=1e-3)


def _space(path: Path) -> str | None:
    m = re.search(r"_space-([A-Za-z0-9]+)_", path.name)
    return m.group(1) if m else None


def mask_transform(bids, out, sub: str, ses: str, mask_path: Path, images: dict[str, Image] | None = None) -> Path | None:
    """The transform of the image a lesion mask was drawn on (None: the reference T1w itself).

    The mask's grid (shape + affine) says which image: an image of its session on the same grid
    (``space-`` entity breaking a tie, T1w preferred otherwise). A mask on a grid of its own follows
    the image its ``space-`` entity names (world coordinates are that image's). A session without
    images (e.g. a stroke follow-up with only the final infarct) is on the reference T1w.
    """
    bids, out = Path(bids), Path(out)
    images = session_images(bids, sub, ses) if images is None else images
    ref_ses = reference_session(bids, sub)
    if "T1w" not in images:  # no T1w of its own: the session's images were aligned to the reference T1w
        images = {**images, "T1w": Image(layout.raw_t1w(bids, sub, ref_ses), "T1w", "anat")}
    img = nib.load(str(mask_path))
    space = _space(mask_path)
    on_grid = [k for k, im in images.items() if im.path.exists()
               and _grid_equal(img, (h := nib.load(str(im.path))).shape, h.affine)]
    if space in on_grid:
        label = space
    elif on_grid:
        label = "T1w" if "T1w" in on_grid else on_grid[0]
    elif space in images:
        label = space
    else:
        raise InputError(f"lesion mask is on the grid of none of the session's images ({', '.join(images)}) and "
                         "its space- entity names none of them: cannot tell which image it was drawn on",
                         file=mask_path, subject=sub)
    image = images[label]
    if label == "T1w" and (image.path == layout.raw_t1w(bids, sub, ref_ses)):
        return None
    path = transform_path(out, sub, ses if image.path.parent.parent.name == f"ses-{ses}" else ref_ses, image)
    if not path.exists():
        raise InputError(f"transform for {image.path.name} not found: run `neurohybrid preprocess align` first",
                         file=path, subject=sub)
    return path


def image_transform(bids, out, sub: str, ses: str, image_path: Path) -> Path:
    """The saved transform of one raw image (reference T1w excluded), checked to exist."""
    for image in session_images(bids, sub, ses).values():
        if image.path == Path(image_path):
            path = transform_path(out, sub, ses, image)
            if not path.exists():
                raise InputError(f"transform for {image.path.name} not found: run `neurohybrid preprocess align` "
                                 "first", file=path, subject=sub)
            return path
    raise InputError("not an image of this session", file=image_path, subject=sub)
