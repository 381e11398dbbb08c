"""FSL backend through nipype's FSL interfaces: BET, FAST, FLIRT, FNIRT (+ InvWarp, ApplyWarp, ConvertXFM).

Selected with ``backend="fsl"`` (``--backend fsl``); needs FSL installed (FSLDIR set and the tools
on PATH), otherwise InputError says so before anything runs. Every command goes through a nipype
interface; the ``*_interface`` builders return them unrun so their exact command lines can be
tested without FSL. Products and names are those of the ANTs backend, with FSL transforms:
``from-T1w_to-MNI..._xfm.mat`` = FLIRT matrix, ``..._xfm.nii.gz`` = FNIRT coefficient file (the
affine included, as FNIRT writes it with ``--aff``); ``from-MNI_to-T1w..._xfm.nii.gz`` = InvWarp
field, ``.mat`` = inverted FLIRT matrix. An ``_xfm.json`` sidecar records ``"Software": "FSL"``
so later steps resample with applywarp.

Cost-function masking: FLIRT ``-inweight`` and FNIRT ``--inmask`` get the brain mask minus the
lesion, so the lesion does not drive the match.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from neurohybrid.errors import InputError

TOOLS = ("bet", "fast", "flirt", "fnirt", "invwarp", "applywarp", "convert_xfm")


def check_fsl(subject=None, file=None) -> None:
    """InputError unless FSL is usable: FSLDIR set and every tool we call on PATH."""
    fsldir = os.environ.get("FSLDIR")
    if not fsldir:
        raise InputError("backend 'fsl' asked for but FSL is not installed (FSLDIR is not set); "
                         "use --backend ants (the embedded default)", subject=subject, file=file)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise InputError(f"backend 'fsl': FSLDIR={fsldir} but {', '.join(missing)} not on PATH",
                         subject=subject, file=file)


def _fsl():
    from nipype.interfaces import fsl

    fsl.FSLCommand.set_default_output_type("NIFTI_GZ")
    return fsl


def bet_interface(in_file, out_file, *, frac=0.5):
    return _fsl().BET(in_file=str(in_file), out_file=str(out_file), mask=True, robust=True, frac=frac)


def fast_interface(in_file, out_basename):
    return _fsl().FAST(in_files=[str(in_file)], out_basename=str(out_basename), number_classes=3,
                       img_type=1, output_biascorrected=True, probability_maps=False)


def flirt_interface(in_file, reference, out_file, out_matrix, *, in_weight=None):
    f = _fsl().FLIRT(in_file=str(in_file), reference=str(reference), out_file=str(out_file),
                     out_matrix_file=str(out_matrix), dof=12, cost="corratio", searchr_x=[-30, 30],
                     searchr_y=[-30, 30], searchr_z=[-30, 30], interp="trilinear")
    if in_weight is not None:
        f.inputs.in_weight = str(in_weight)
    return f


def fnirt_interface(in_file, ref_file, affine_file, fieldcoeff_file, warped_file, *, inmask_file=None,
                    refmask_file=None):
    f = _fsl().FNIRT(in_file=str(in_file), ref_file=str(ref_file), affine_file=str(affine_file),
                     fieldcoeff_file=str(fieldcoeff_file), warped_file=str(warped_file),
                     subsampling_scheme=[4, 2, 1, 1], max_nonlin_iter=[5, 5, 5, 5],
                     regularization_lambda=[300, 75, 30, 30], intensity_mapping_model="global_non_linear_with_bias",
                     log_file=str(Path(str(fieldcoeff_file)).with_name("fnirt_log.txt")))
    if inmask_file is not None:
        f.inputs.inmask_file = str(inmask_file)
    if refmask_file is not None:
        f.inputs.refmask_file = str(refmask_file)
    return f


def invwarp_interface(warp, reference, inverse_warp):
    return _fsl().InvWarp(warp=str(warp), reference=str(reference), inverse_warp=str(inverse_warp))


def applywarp_interface(in_file, ref_file, field_file, out_file, *, interp="trilinear"):
    return _fsl().ApplyWarp(in_file=str(in_file), ref_file=str(ref_file), field_file=str(field_file),
                            out_file=str(out_file), interp=interp)


def invert_matrix_interface(in_file, out_file):
    return _fsl().ConvertXFM(in_file=str(in_file), out_file=str(out_file), invert_xfm=True)


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def run_anat_fsl(t1_path, t1_img, sub, out, *, lesion, model_voxel_mm, threads=None) -> dict:
    """The FSL counterpart of the ANTs structural step; same derivatives (see cli.py)."""
    import time

    from neurohybrid.anatomy.atlas import load_dk_atlas
    from neurohybrid.anatomy.templates import load_template, registration_voxel_mm
    from neurohybrid.io import save_volume, write_json, write_tsv
    from neurohybrid.preprocessing.layout import Derivatives
    from neurohybrid.preprocessing.parcellation import cerebellum_gm_template, regional_volumes
    from neurohybrid.preprocessing.qc import qc_figure

    check_fsl(subject=sub, file=t1_path)
    d = Derivatives(out, sub)
    times = {}
    reg_mm = registration_voxel_mm(t1_img)
    aff = t1_img.affine
    with tempfile.TemporaryDirectory(prefix=f"nh-fsl-{sub}-") as work:
        w = Path(work)
        t1 = w / "t1.nii.gz"
        _save(t1, t1_img.get_fdata(dtype=np.float32), aff)
        tpl = load_template("t1", reg_mm)
        tpl_brain = load_template("brain", reg_mm)
        _save(w / "tpl.nii.gz", tpl.get_fdata(dtype=np.float32), tpl.affine)
        _save(w / "tpl_mask.nii.gz", tpl_brain.get_fdata(dtype=np.float32), tpl.affine)

        t = time.perf_counter()
        bet_interface(t1, w / "brain.nii.gz").run(cwd=work)
        mask = nib.load(w / "brain_mask.nii.gz").get_fdata() > 0
        if not mask.any():
            raise InputError("brain mask from BET is empty", file=t1_path, subject=sub)
        times["brain_extraction"] = time.perf_counter() - t

        t = time.perf_counter()
        weight = mask & ~(ndimage.binary_dilation(lesion, iterations=1) if lesion is not None else False)
        _save(w / "weight.nii.gz", weight.astype(np.uint8), aff)
        flirt_interface(w / "brain.nii.gz", w / "tpl.nii.gz", w / "flirt.nii.gz", w / "affine.mat",
                        in_weight=w / "weight.nii.gz").run(cwd=work)
        fnirt_interface(t1, w / "tpl.nii.gz", w / "affine.mat", w / "coef.nii.gz", w / "fnirt.nii.gz",
                        inmask_file=w / "weight.nii.gz", refmask_file=w / "tpl_mask.nii.gz").run(cwd=work)
        invwarp_interface(w / "coef.nii.gz", t1, w / "inv.nii.gz").run(cwd=work)
        invert_matrix_interface(w / "affine.mat", w / "inv.mat").run(cwd=work)
        d.anat.mkdir(parents=True, exist_ok=True)
        from neurohybrid.io import atomic_path

        for src, dst in ((w / "coef.nii.gz", d.forward_transforms[0]), (w / "affine.mat", d.forward_transforms[1]),
                         (w / "inv.mat", d.inverse_transforms[0]), (w / "inv.nii.gz", d.inverse_transforms[1])):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        for stem in (d.xfm_forward_stem, d.xfm_inverse_stem):
            write_json(Path(f"{stem}.json"), {"Software": "FSL", "Tools": "FLIRT (dof 12) + FNIRT; InvWarp"})
        times["registration"] = time.perf_counter() - t

        t = time.perf_counter()
        fast_interface(w / "brain.nii.gz", w / "fast").run(cwd=work)
        # FAST on a T1 orders classes by mean intensity: 0 CSF, 1 GM, 2 WM
        probs = {tissue: np.where(mask, nib.load(w / f"fast_pve_{k}.nii.gz").get_fdata(), 0.0).clip(0, 1)
                 for k, tissue in enumerate(("CSF", "GM", "WM"))}
        restored = nib.load(w / "fast_restore.nii.gz").get_fdata()
        times["segmentation"] = time.perf_counter() - t

        t = time.perf_counter()
        dk_img, regions = load_dk_atlas(reg_mm)
        _save(w / "dk.nii.gz", np.asarray(dk_img.dataobj).astype(np.int16), dk_img.affine)
        applywarp_interface(w / "dk.nii.gz", t1, w / "inv.nii.gz", w / "dk_sub.nii.gz", interp="nn").run(cwd=work)
        dseg = np.where(mask, np.rint(nib.load(w / "dk_sub.nii.gz").get_fdata()), 0).astype(np.int16)
        cereb_t = cerebellum_gm_template(load_template("gm", reg_mm), dk_img)
        _save(w / "cb.nii.gz", cereb_t.astype(np.uint8), tpl.affine)
        applywarp_interface(w / "cb.nii.gz", t1, w / "inv.nii.gz", w / "cb_sub.nii.gz", interp="nn").run(cwd=work)
        cereb = (nib.load(w / "cb_sub.nii.gz").get_fdata() > 0.5) & mask & (dseg == 0)
        applywarp_interface(_tpl_file(w, "gm", reg_mm), t1, w / "inv.nii.gz",
                            w / "gm_sub.nii.gz").run(cwd=work)
        template_gm = nib.load(w / "gm_sub.nii.gz").get_fdata()
        times["parcellation"] = time.perf_counter() - t

        save_volume(d.preproc_t1w, restored, aff)
        save_volume(d.brain_mask, mask, aff, dtype=np.uint8)
        for tissue, p in probs.items():
            save_volume(d.probseg(tissue), p, aff)
        save_volume(d.dseg, dseg, aff, dtype=np.int16)
        save_volume(d.cerebellum, cereb, aff, dtype=np.uint8)
        write_tsv(d.dseg_tsv, pd.DataFrame({"index": regions["id"], "name": regions["name"]}))
        write_tsv(d.volumes, regional_volumes(dseg, float(abs(np.linalg.det(aff[:3, :3]))), regions))

        model = load_template("t1", model_voxel_mm)
        _save(w / "model_ref.nii.gz", model.get_fdata(dtype=np.float32), model.affine)
        for tissue in ("GM", "WM", "CSF"):  # CSF: the glioma corrections' ventricle distance
            _save(w / f"p_{tissue}.nii.gz", probs[tissue].astype(np.float32), aff)
            applywarp_interface(w / f"p_{tissue}.nii.gz", w / "model_ref.nii.gz", w / "coef.nii.gz",
                                w / f"m_{tissue}.nii.gz").run(cwd=work)
            save_volume(d.model_probseg(tissue), nib.load(w / f"m_{tissue}.nii.gz").get_fdata().clip(0, 1),
                        model.affine)
    qc_figure(d.qc_png, t1=restored, brain_mask=mask, template_gm=template_gm, probs=probs, dseg=dseg,
              title=f"sub-{sub}: {Path(t1_path).name} (FSL)")
    return times


def _tpl_file(work: Path, kind: str, voxel_mm: float) -> Path:
    from neurohybrid.anatomy.templates import load_template

    img = load_template(kind, voxel_mm)
    path = work / f"tpl_{kind}.nii.gz"
    _save(path, img.get_fdata(dtype=np.float32), img.affine)
    return path


def apply_forward_fsl(in_img: nib.Nifti1Image, coef: Path, ref_img: nib.Nifti1Image, *, interp="trilinear") -> np.ndarray:
    """Subject image -> template grid of ref_img with the saved FNIRT coefficients (applywarp)."""
    check_fsl()
    with tempfile.TemporaryDirectory(prefix="nh-fslapply-") as work:
        w = Path(work)
        _save(w / "in.nii.gz", in_img.get_fdata(dtype=np.float32), in_img.affine)
        _save(w / "ref.nii.gz", ref_img.get_fdata(dtype=np.float32), ref_img.affine)
        applywarp_interface(w / "in.nii.gz", w / "ref.nii.gz", coef, w / "out.nii.gz", interp=interp).run(cwd=work)
        return nib.load(w / "out.nii.gz").get_fdata()
