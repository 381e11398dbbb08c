"""FSL backend through fslpy's ``fsl.wrappers`` (the FSL team's Python wrappers): BET, FAST, FLIRT,
FNIRT, InvWarp, ApplyWarp, convert_xfm.

Selected with ``backend="fsl"`` (``--backend fsl``); needs FSL installed (FSLDIR set and the tools
in $FSLDIR/bin or on PATH) and fslpy, otherwise InputError says so before anything runs. Each
builder below passes our settings to one wrapper; ``cmdonly=True`` returns the command line
unrun, so the exact calls can be tested without FSL. Inputs may be nibabel images in memory (fslpy
writes them to temporary files); transforms are written to named files because they are kept.
Products and names are those of the ANTs backend, with FSL transforms:
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


def _on_path(tool: str, fsldir: str) -> bool:
    return os.access(Path(fsldir) / "bin" / tool, os.X_OK) or shutil.which(tool) is not None


def check_fsl(subject=None, file=None) -> None:
    """InputError unless FSL is usable: FSLDIR set, every tool we call found, fslpy installed."""
    fsldir = os.environ.get("FSLDIR")
    if not fsldir:
        raise InputError("backend 'fsl' asked for but FSL is not installed (FSLDIR is not set); "
                         "use --backend ants (the embedded default)", subject=subject, file=file)
    missing = [t for t in TOOLS if not _on_path(t, fsldir)]
    if missing:
        raise InputError(f"backend 'fsl': FSLDIR={fsldir} but {', '.join(missing)} not in $FSLDIR/bin or on PATH",
                         subject=subject, file=file)
    _wrappers(subject=subject, file=file)


def _wrappers(subject=None, file=None):
    try:
        from fsl import wrappers
    except ImportError:
        raise InputError("backend 'fsl' needs the fslpy package (pinned in envs/requirements.lock)",
                         subject=subject, file=file) from None
    return wrappers


def _str(path):
    return path if isinstance(path, nib.Nifti1Image) else str(path)


def bet(in_file, out_file, *, frac=0.5, cmdonly=False):
    return _wrappers().bet(_str(in_file), str(out_file), mask=True, robust=True, fracintensity=frac, cmdonly=cmdonly)


def fast(in_file, out_basename, *, cmdonly=False):
    # -t 1: T1-weighted; -B: write the bias-corrected (restored) image
    return _wrappers().fast(_str(in_file), str(out_basename), n_classes=3, t=1, B=True, cmdonly=cmdonly)


def flirt(in_file, reference, out_file, out_matrix, *, in_weight=None, cmdonly=False):
    extra = {} if in_weight is None else {"inweight": _str(in_weight)}
    return _wrappers().flirt(_str(in_file), _str(reference), out=str(out_file), omat=str(out_matrix), dof=12,
                             cost="corratio", searchrx=(-30, 30), searchry=(-30, 30), searchrz=(-30, 30),
                             interp="trilinear", cmdonly=cmdonly, **extra)


def fnirt(in_file, ref_file, affine_file, fieldcoeff_file, warped_file, *, inmask_file=None, refmask_file=None,
          cmdonly=False):
    extra = {}
    if inmask_file is not None:
        extra["inmask"] = _str(inmask_file)
    if refmask_file is not None:
        extra["refmask"] = _str(refmask_file)
    # "lambda" is a Python keyword: passed through the dict
    extra["lambda"] = (300, 75, 30, 30)
    return _wrappers().fnirt(_str(in_file), ref=_str(ref_file), aff=str(affine_file), cout=str(fieldcoeff_file),
                             iout=str(warped_file), subsamp=(4, 2, 1, 1), miter=(5, 5, 5, 5),
                             intmod="global_non_linear_with_bias",
                             logout=str(Path(str(fieldcoeff_file)).with_name("fnirt_log.txt")), cmdonly=cmdonly, **extra)


def invwarp(warp, reference, inverse_warp, *, cmdonly=False):
    return _wrappers().invwarp(str(warp), _str(reference), str(inverse_warp), cmdonly=cmdonly)


def applywarp(in_file, ref_file, field_file, out_file, *, interp="trilinear", cmdonly=False):
    return _wrappers().applywarp(_str(in_file), _str(ref_file), _str(out_file), warp=str(field_file), interp=interp,
                                 cmdonly=cmdonly)


def invert_matrix(in_file, out_file, *, cmdonly=False):
    return _wrappers().invxfm(str(in_file), str(out_file), cmdonly=cmdonly)


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
        bet(t1, w / "brain.nii.gz")
        mask = nib.load(w / "brain_mask.nii.gz").get_fdata() > 0
        if not mask.any():
            raise InputError("brain mask from BET is empty", file=t1_path, subject=sub)
        times["brain_extraction"] = time.perf_counter() - t

        t = time.perf_counter()
        weight = mask & ~(ndimage.binary_dilation(lesion, iterations=1) if lesion is not None else False)
        _save(w / "weight.nii.gz", weight.astype(np.uint8), aff)
        flirt(w / "brain.nii.gz", w / "tpl.nii.gz", w / "flirt.nii.gz", w / "affine.mat", in_weight=w / "weight.nii.gz")
        fnirt(t1, w / "tpl.nii.gz", w / "affine.mat", w / "coef.nii.gz", w / "fnirt.nii.gz",
              inmask_file=w / "weight.nii.gz", refmask_file=w / "tpl_mask.nii.gz")
        invwarp(w / "coef.nii.gz", t1, w / "inv.nii.gz")
        invert_matrix(w / "affine.mat", w / "inv.mat")
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
        fast(w / "brain.nii.gz", w / "fast")
        # FAST on a T1 orders classes by mean intensity: 0 CSF, 1 GM, 2 WM
        probs = {tissue: np.where(mask, nib.load(w / f"fast_pve_{k}.nii.gz").get_fdata(), 0.0).clip(0, 1)
                 for k, tissue in enumerate(("CSF", "GM", "WM"))}
        restored = nib.load(w / "fast_restore.nii.gz").get_fdata()
        times["segmentation"] = time.perf_counter() - t

        t = time.perf_counter()
        dk_img, regions = load_dk_atlas(reg_mm)
        _save(w / "dk.nii.gz", np.asarray(dk_img.dataobj).astype(np.int16), dk_img.affine)
        applywarp(w / "dk.nii.gz", t1, w / "inv.nii.gz", w / "dk_sub.nii.gz", interp="nn")
        dseg = np.where(mask, np.rint(nib.load(w / "dk_sub.nii.gz").get_fdata()), 0).astype(np.int16)
        cereb_t = cerebellum_gm_template(load_template("gm", reg_mm), dk_img)
        _save(w / "cb.nii.gz", cereb_t.astype(np.uint8), tpl.affine)
        applywarp(w / "cb.nii.gz", t1, w / "inv.nii.gz", w / "cb_sub.nii.gz", interp="nn")
        cereb = (nib.load(w / "cb_sub.nii.gz").get_fdata() > 0.5) & mask & (dseg == 0)
        # the template GM as an in-memory image: fslpy writes it to a temporary file itself
        applywarp(load_template("gm", reg_mm), t1, w / "inv.nii.gz", w / "gm_sub.nii.gz")
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
            applywarp(w / f"p_{tissue}.nii.gz", w / "model_ref.nii.gz", w / "coef.nii.gz", w / f"m_{tissue}.nii.gz")
            save_volume(d.model_probseg(tissue), nib.load(w / f"m_{tissue}.nii.gz").get_fdata().clip(0, 1),
                        model.affine)
    qc_figure(d.qc_png, t1=restored, brain_mask=mask, template_gm=template_gm, probs=probs, dseg=dseg,
              title=f"sub-{sub}: {Path(t1_path).name} (FSL)")
    return times


def apply_forward_fsl(in_img: nib.Nifti1Image, coef: Path, ref_img: nib.Nifti1Image, *, interp="trilinear") -> np.ndarray:
    """Subject image -> template grid of ref_img with the saved FNIRT coefficients (applywarp)."""
    check_fsl()
    with tempfile.TemporaryDirectory(prefix="nh-fslapply-") as work:
        w = Path(work)
        _save(w / "in.nii.gz", in_img.get_fdata(dtype=np.float32), in_img.affine)
        _save(w / "ref.nii.gz", ref_img.get_fdata(dtype=np.float32), ref_img.affine)
        applywarp(w / "in.nii.gz", w / "ref.nii.gz", coef, w / "out.nii.gz", interp=interp)
        return nib.load(w / "out.nii.gz").get_fdata()
