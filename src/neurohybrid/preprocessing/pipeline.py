"""Per-subject preprocessing steps behind `neurohybrid preprocess ...` (see cli.py for the contract)."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from neurohybrid.anatomy.atlas import load_dk_atlas, region_table
from neurohybrid.anatomy.templates import load_template, registration_voxel_mm
from neurohybrid.errors import InputError
from neurohybrid.preprocessing.plausibility import check_contrast, check_tissue_volumes
from neurohybrid.io import check_same_grid, load_image, save_volume, write_json, write_tsv
from neurohybrid.preprocessing import layout
from neurohybrid.preprocessing.layout import Derivatives

log = logging.getLogger(__name__)


def _lesion_union(bids, sub, ses, ref_img, ref_path, out, backend) -> np.ndarray | None:
    """The session's lesion masks on the T1w grid (cost-function masking). A mask drawn on another
    image (e.g. FLAIR's grid) comes through that image's rigid transform (`preprocess align`),
    linear + 0.5 like every mask (see run_lesions)."""
    from neurohybrid.preprocessing import align

    found = layout.raw_lesions(bids, sub, ses)
    if not found:
        return None
    union = np.zeros(ref_img.shape, bool)
    ref = (str(ref_path), np.empty(ref_img.shape), ref_img.affine)
    for path in found.values():
        img = load_image(path, subject=sub)
        data = np.asarray(img.dataobj)
        xfm = None if backend == "fsl" else align.mask_transform(bids, out, sub, ses, path)
        if xfm is None:
            check_same_grid(ref, (str(path), data, img.affine), subject=sub)
            union |= data > 0.5
        else:
            union |= _resample(nib.Nifti1Image((data > 0.5).astype(np.float32), img.affine), ref_img, [xfm]) >= 0.5
    return union


def _resample(img: nib.Nifti1Image, ref_img: nib.Nifti1Image, transforms, *, interpolator="linear") -> np.ndarray:
    """img onto ref_img's grid through ANTs transforms (ants.apply_transforms order), one interpolation."""
    import ants

    from neurohybrid.preprocessing import ants_backend as ab

    return ants.apply_transforms(ab.to_ants(nib.Nifti1Image(np.zeros(ref_img.shape[:3], np.float32), ref_img.affine)),
                                 ab.to_ants(img), [str(p) for p in transforms], interpolator=interpolator).numpy()


def _fsl_transforms(d: Derivatives) -> bool:
    sidecar = Path(f"{d.xfm_forward_stem}.json")
    return sidecar.exists() and "FSL" in sidecar.read_text()


def run_anat(bids, subject, out, *, model_voxel_mm=2.0, fast=False, backend="ants", threads=None,
             session=None, lesion_masking=True) -> dict:
    """Structural preprocessing of one subject; returns timings (s) per stage.

    ``lesion_masking``: exclude the session's lesion masks (and a 1-voxel rim) from the registration
    metric (cost-function masking, the default); False registers as if the subject had no lesion
    (the comparison of benchmarks/bench_lesion_masking.py)."""
    bids, out = Path(bids), Path(out)
    sub = layout.subject_label(subject)
    ses = session or layout.sessions(bids, sub)[0]
    t1_path = layout.raw_t1w(bids, sub, ses)
    if not t1_path.exists():
        raise InputError("missing modality: T1w image not found", file=t1_path, subject=sub)
    t1_img = load_image(t1_path, subject=sub, ndim=3)
    if not np.nanmax(np.asarray(t1_img.dataobj, dtype=np.float32)) > 0:
        raise InputError("brain mask is empty: the image has no positive intensities (blank T1w)",
                         file=t1_path, subject=sub)
    lesion = _lesion_union(bids, sub, ses, t1_img, t1_path, out, backend) if lesion_masking else None
    layout.write_dataset_description(out)
    if backend == "fsl":
        from neurohybrid.preprocessing.fsl_backend import run_anat_fsl

        return run_anat_fsl(t1_path, t1_img, sub, out, lesion=lesion, model_voxel_mm=model_voxel_mm, threads=threads)
    if backend != "ants":
        raise InputError(f"unknown backend {backend!r} (ants or fsl)", subject=sub)
    return _run_anat_ants(t1_path, t1_img, sub, out, lesion=lesion, model_voxel_mm=model_voxel_mm,
                          fast=fast, threads=threads)


def _run_anat_ants(t1_path, t1_img, sub, out, *, lesion, model_voxel_mm, fast, threads) -> dict:
    from neurohybrid.preprocessing import ants_backend as ab
    from neurohybrid.preprocessing.parcellation import cerebellum_gm_template, regional_volumes
    from neurohybrid.preprocessing.qc import qc_figure
    from neurohybrid.preprocessing.segmentation import atropos_segment

    ab.set_threads(threads)
    sched = ab.schedule(fast)
    d = Derivatives(out, sub)
    times = {}
    reg_mm = registration_voxel_mm(t1_img)
    tpl_t1 = load_template("t1", reg_mm)
    tpl_brain = load_template("brain", reg_mm)
    a_t1 = ab.to_ants(t1_img)
    a_tpl = ab.to_ants(tpl_t1)
    a_tpl_brain = ab.to_ants(tpl_brain)
    with tempfile.TemporaryDirectory(prefix=f"nh-anat-{sub}-") as work:
        work = Path(work)
        t = time.perf_counter()
        t1n = ab.n4(a_t1)
        times["n4"] = time.perf_counter() - t

        t = time.perf_counter()
        # extraction only needs a coarse match (the mask is refined on intensities): FAST schedule
        mask = ab.extract_brain(t1n, a_tpl, a_tpl_brain, sched=ab.FAST, outprefix=str(work / "bet_"))
        mask_np = mask.numpy() > 0
        if mask_np.sum() == 0:
            raise InputError("brain mask is empty after template-based extraction (is the image blank "
                             "or not a T1w brain?)", file=t1_path, subject=sub)
        check_contrast(np.asarray(t1_img.dataobj, dtype=np.float32)[mask_np], file=t1_path, subject=sub)  # before N4, which adds structure
        times["brain_extraction"] = time.perf_counter() - t

        t = time.perf_counter()
        brain = t1n * mask
        moving_mask = mask_np.copy()
        if lesion is not None:
            # cost-function masking: the lesion and a 1-voxel rim (oedema, partial volume) are excluded
            moving_mask &= ~ndimage.binary_dilation(lesion, iterations=1)
        reg = ab.register(a_tpl * a_tpl_brain, brain, sched=sched, fixed_mask=a_tpl_brain,
                          moving_mask=t1n.new_image_like(moving_mask.astype(np.float32)),
                          outprefix=str(work / "reg_"))
        d.anat.mkdir(parents=True, exist_ok=True)
        fwd, inv = ab.save_transforms(reg, d.xfm_forward_stem, d.xfm_inverse_stem)
        for stem, order in ((d.xfm_forward_stem, "[xfm.nii.gz, xfm.mat]"),
                            (d.xfm_inverse_stem, "[xfm.mat (inverted), xfm.nii.gz]")):
            write_json(Path(f"{stem}.json"), {"Software": "ANTs (antspyx)", "ApplyOrder": order,
                                              "Schedule": dataclasses.asdict(sched),
                                              "LesionMasked": lesion is not None})
        times["registration"] = time.perf_counter() - t

    t = time.perf_counter()
    priors = {k: ab.apply(ab.to_ants(load_template(k.lower(), reg_mm)), t1n, inv, invert=ab.INVERSE_INVERT) for k in ("CSF", "GM", "WM")}
    probs = atropos_segment(t1n, mask, priors, iterations=5 if fast else 15)
    times["segmentation"] = time.perf_counter() - t
    vox_vol = float(abs(np.linalg.det(t1_img.affine[:3, :3])))  # mm^3
    try:
        check_tissue_volumes(probs, vox_vol / 1000.0, file=t1_path, subject=sub)
    except InputError:
        for path in (*fwd, *inv, Path(f"{d.xfm_forward_stem}.json"), Path(f"{d.xfm_inverse_stem}.json")):
            path.unlink(missing_ok=True)  # written after registration: a failed run leaves nothing
        raise

    t = time.perf_counter()
    dk_img, regions = load_dk_atlas(reg_mm)
    dseg = ab.apply(ab.to_ants(dk_img), t1n, inv, interpolator="genericLabel", invert=ab.INVERSE_INVERT).numpy()
    dseg = np.where(mask_np, np.rint(dseg), 0).astype(np.int16)
    cereb_t = cerebellum_gm_template(load_template("gm", reg_mm), dk_img).astype(np.float32)
    cereb = ab.apply(ab.to_ants(nib.Nifti1Image(cereb_t, tpl_t1.affine)), t1n, inv, interpolator="genericLabel",
                     invert=ab.INVERSE_INVERT).numpy()
    cereb = (cereb > 0.5) & mask_np & (dseg == 0)
    volumes = regional_volumes(dseg, vox_vol, regions)
    times["parcellation"] = time.perf_counter() - t

    aff = t1_img.affine
    save_volume(d.preproc_t1w, t1n.numpy(), aff)
    save_volume(d.brain_mask, mask_np, aff, dtype=np.uint8)
    for tissue, p in probs.items():
        save_volume(d.probseg(tissue), p, aff)
    save_volume(d.dseg, dseg, aff, dtype=np.int16)
    save_volume(d.cerebellum, cereb, aff, dtype=np.uint8)
    write_tsv(d.dseg_tsv, pd.DataFrame({"index": regions["id"], "name": regions["name"]}))
    write_tsv(d.volumes, volumes)

    t = time.perf_counter()
    model_ref = ab.to_ants(load_template("t1", model_voxel_mm))
    for tissue in ("GM", "WM", "CSF"):  # CSF: the glioma corrections' ventricle distance
        warped = ab.apply(t1n.new_image_like(probs[tissue].astype(np.float32)), model_ref, fwd).numpy()
        save_volume(d.model_probseg(tissue), warped.clip(0, 1), load_template("t1", model_voxel_mm).affine)
    times["model_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    qc_figure(d.qc_png, t1=t1n.numpy(), brain_mask=mask_np, template_gm=priors["GM"].numpy(), probs=probs,
              dseg=dseg, title=f"sub-{sub}: {t1_path.name}")
    times["qc"] = time.perf_counter() - t
    log.info("sub-%s anat timings %s", sub, times)
    return times


# ---------------------------------------------------------------- later steps (need run_anat outputs)

def _require(path: Path, sub: str, what: str) -> Path:
    if not Path(path).exists():
        raise InputError(f"{what} not found: run `neurohybrid preprocess anat` first", file=path, subject=sub)
    return Path(path)


def to_model_grid(img: nib.Nifti1Image, d: Derivatives, model_voxel_mm: float, *, binary: bool,
                  rigid: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image onto the template grid at model_voxel_mm with the saved transforms.

    ``rigid``: the image's ``from-<suffix>_to-T1w`` transform (`preprocess align`), chained after
    T1w -> template so the image is interpolated once, whatever its grid; None for an image on the
    subject's T1w. Masks are interpolated linearly and thresholded at 0.5: with downsampling (and
    with a mask on a coarser or anisotropic grid, e.g. 1x1x3 mm FLAIR) this keeps the
    partial-volume-weighted extent, where nearest neighbour would alias thin structures and shift
    edges by up to half a source voxel.
    """
    for p in d.forward_transforms:
        _require(p, d.sub, "forward transform")
    ref_img = load_template("t1", model_voxel_mm)
    if _fsl_transforms(d):
        from neurohybrid.preprocessing.fsl_backend import apply_forward_fsl

        if rigid is not None:
            raise InputError("the FSL backend takes images on the subject's T1w grid only (use backend ants)",
                             file=rigid, subject=d.sub)
        out = apply_forward_fsl(img, d.forward_transforms[0], ref_img)
        return ((out >= 0.5) if binary else out), ref_img.affine
    out = _resample(img, ref_img, [*d.forward_transforms, *([rigid] if rigid is not None else [])])
    return ((out >= 0.5) if binary else out), ref_img.affine


def run_lesions(bids, subject, out, *, model_voxel_mm=2.0) -> list[Path]:
    from neurohybrid.preprocessing import align

    bids, out = Path(bids), Path(out)
    sub = layout.subject_label(subject)
    d = Derivatives(out, sub)
    t1 = load_image(_require(d.preproc_t1w, sub, "preprocessed T1w"), subject=sub)
    ref = (str(d.preproc_t1w), np.empty(t1.shape), t1.affine)
    fsl = _fsl_transforms(d)
    written = []
    for ses in layout.sessions(bids, sub):
        for kind, path in layout.raw_lesions(bids, sub, ses, layout.LESION_KINDS + layout.TREATMENT_KINDS).items():
            img = load_image(path, subject=sub)
            if fsl:
                check_same_grid(ref, (str(path), np.empty(img.shape), img.affine), subject=sub)
            # the mask goes through the transform of the image it was drawn on, chained to the template
            xfm = None if fsl else align.mask_transform(bids, out, sub, ses, path)
            data, aff = to_model_grid(nib.Nifti1Image((np.asarray(img.dataobj) > 0.5).astype(np.float32), img.affine),
                                      d, model_voxel_mm, binary=True, rigid=xfm)
            save_volume(d.model_lesion(ses, kind), data, aff, dtype=np.uint8)
            written.append(d.model_lesion(ses, kind))
        cbf_path = layout.raw_cbf(bids, sub, ses)
        if cbf_path.exists():
            img = load_image(cbf_path, subject=sub)
            if fsl:
                check_same_grid(ref, (str(cbf_path), np.empty(img.shape), img.affine), subject=sub)
            if np.asarray(img.dataobj).min() < 0:
                raise InputError("CBF has negative values (expected ml/100 ml/min)", file=cbf_path, subject=sub)
            xfm = None if fsl else align.image_transform(bids, out, sub, ses, cbf_path)
            data, aff = to_model_grid(img, d, model_voxel_mm, binary=False, rigid=xfm)
            save_volume(d.model_cbf(ses), data.clip(0, None), aff)
            written.append(d.model_cbf(ses))
    if not written:
        raise InputError("missing modality: no lesion masks (derivatives/lesions) and no CBF for any session",
                         file=bids / f"sub-{sub}", subject=sub)
    layout.write_dataset_description(out)
    return written


def run_pet(bids, subject, out) -> list[Path]:
    from neurohybrid.preprocessing import align
    from neurohybrid.preprocessing.parcellation import regional_suvr

    bids, out = Path(bids), Path(out)
    sub = layout.subject_label(subject)
    d = Derivatives(out, sub)
    dseg_img = load_image(_require(d.dseg, sub, "DK parcellation"), subject=sub)
    cereb_img = load_image(_require(d.cerebellum, sub, "cerebellar GM reference mask"), subject=sub)
    dseg = np.asarray(dseg_img.dataobj).astype(np.int64)
    cereb = np.asarray(cereb_img.dataobj) > 0
    regions = region_table()  # names only: no need to resample the atlas image
    fsl = _fsl_transforms(d)
    written = []
    for ses in layout.sessions(bids, sub):
        for path in layout.raw_pet(bids, sub, ses):
            img = load_image(path, subject=sub, ndim=3)
            if fsl:
                data = img.get_fdata()
                check_same_grid((str(d.dseg), dseg, dseg_img.affine), (str(path), data, img.affine), subject=sub)
            else:
                # PET onto the parcellation's (T1w) grid through its rigid transform, linear: the
                # regional mean then averages over the atlas region at T1w resolution (the usual
                # PET-to-T1w direction; labels stay exact, no nearest-neighbour label resampling)
                xfm = align.image_transform(bids, out, sub, ses, path)
                data = _resample(nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine), dseg_img, [xfm])
            table = regional_suvr(data, dseg, cereb, regions, subject=sub, file=path)
            write_tsv(d.suvr(ses), table)
            written.append(d.suvr(ses))
    if not written:
        raise InputError("missing modality: no PET image (ses-*/pet/*_pet.nii.gz) for any session",
                         file=bids / f"sub-{sub}", subject=sub)
    layout.write_dataset_description(out)
    return written


def run_connectome(bids, subject, out, *, method="auto", normative_csv=None, fast=False, threads=None) -> Path:
    from neurohybrid.preprocessing import connectome as cx

    bids, out = Path(bids), Path(out)
    sub = layout.subject_label(subject)
    d = Derivatives(out, sub)
    dseg_img = load_image(_require(d.dseg, sub, "DK parcellation"), subject=sub)
    regions = region_table()  # names only: no need to resample the atlas image
    dwi = dwi_ses = None
    for dwi_ses in layout.sessions(bids, sub):
        dwi = layout.raw_dwi(bids, sub, dwi_ses)
        if dwi:
            break
    if method == "auto":
        method = "dipy" if dwi else "normative"
    if method in ("dipy", "mrtrix"):
        from neurohybrid.preprocessing import align

        if dwi is None:
            raise InputError(f"missing modality: connectome method {method!r} needs DWI, none found",
                             file=bids / f"sub-{sub}", subject=sub)
        wm_img = load_image(_require(d.probseg("WM"), sub, "WM probability map"), subject=sub)
        mask_img = load_image(_require(d.brain_mask, sub, "brain mask"), subject=sub)
        to_dwi = align.image_transform(bids, out, sub, dwi_ses, dwi[0])
        result = cx.dwi_connectome(*dwi, dseg_img, wm_img, mask_img, regions, method=method, fast=fast,
                                   threads=threads, subject=sub, to_dwi=to_dwi)
    else:
        result = cx.normative_for_subject(dseg_img, regions, csv=normative_csv, subject=sub)
    cx.write_connectome(d.connectivity, result)
    layout.write_dataset_description(out)
    return d.connectivity
