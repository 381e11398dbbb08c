"""`neurohybrid preprocess ...`: the commands the workflow rules call, one subject per call.

All commands share ``--bids B`` (raw BIDS root), ``--subject S`` (label without ``sub-``) and
``--out O`` (the derivatives root, normally ``results/preproc``). Each writes
``O/dataset_description.json`` (DatasetType derivative, GeneratedBy neurohybrid) if missing.
Bad input (missing modality/file, 4D where 3D is expected, NaN/singular affine, empty brain mask)
raises InputError naming subject and file: the CLI prints one line and exits 2, and writes nothing.

0. Within-subject alignment (run first; every subject)::

     neurohybrid preprocess align --bids B --subject S --out O [--fast] [--backend ants|fsl] [--threads N]

   reads   every image of every session: ses-*/anat/*_T1w, *_FLAIR, *_ce-*_T1w, ses-*/pet/*_pet,
           ses-*/perf/*_cbf, ses-*/dwi/*_dwi (mean b0), on any grid, orientation, voxel size, datatype
           and scale factor
   writes  O/sub-S/ses-SES/<datatype>/<entities>_from-<suffix>_to-T1w_mode-image_xfm.mat (+ .json)
           rigid (Mattes MI, antspyx): image -> its session's T1w -> the first session's T1w, composed
           into one ANTs affine mapping reference-T1w points to image points (see align.py);
           the first session's T1w (the reference) has none
           O/sub-S/figures/align/sub-S_ses-SES_desc-align_qc.png   every image over its session's
           T1w after alignment, lesion masks outlined
   ``--backend fsl``: the FSL steps resample with FSL matrices from the T1w only, so every image
   must already be on the first session's T1w grid and within a voxel of it: anything else stops
   with an InputError naming the file (use the ants backend for unaligned data).

1. Structural (after ``align``; every subject)::

     neurohybrid preprocess anat --bids B --subject S --out O [--model-voxel-mm 2] [--fast]
                                 [--backend ants|fsl] [--threads N] [--session SES] [--no-lesion-masking]

   reads   B/sub-S/ses-<first>/anat/sub-S_ses-<first>_T1w.nii.gz   (first session of
           sub-S_sessions.tsv, else the first ses-* folder in sorted order; --session overrides)
           B/derivatives/lesions/sub-S/ses-<first>/anat/sub-S_ses-<first>_[space-<x>_]desc-*_mask.nii.gz
           (optional, on the grid of any image of that session: through its ``align`` transform;
           their union is excluded from the registration metric: cost-function masking)
   writes  O/sub-S/anat/sub-S_desc-preproc_T1w.nii.gz                 N4-corrected T1w
           O/sub-S/anat/sub-S_desc-brain_mask.nii.gz
           O/sub-S/anat/sub-S_label-{GM,WM,CSF}_probseg.nii.gz          Atropos / FAST
           O/sub-S/anat/sub-S_from-T1w_to-MNI152NLin2009cSym_mode-image_xfm.{mat,nii.gz}
           O/sub-S/anat/sub-S_from-MNI152NLin2009cSym_to-T1w_mode-image_xfm.{mat,nii.gz}
           O/sub-S/anat/sub-S_atlas-DK_dseg.nii.gz (+ _dseg.tsv: index, name)
           O/sub-S/anat/sub-S_atlas-DK_desc-volumes.tsv                (region, volume_mm3)
           O/sub-S/anat/sub-S_label-cerebellumGM_mask.nii.gz           PET reference region
           O/sub-S/anat/sub-S_space-MNI152NLin2009cSym_res-model_label-{GM,WM,CSF}_probseg.nii.gz
           O/sub-S/figures/sub-S_desc-qc.png
   ``--fast`` uses the short registration schedule (tests / sloppy mode); ``--backend fsl`` uses
   BET/FAST/FLIRT/FNIRT through fslpy's fsl.wrappers and needs FSLDIR (clear error otherwise).
   ANTs transforms: the ``.mat`` is the affine, the ``.nii.gz`` the SyN displacement field; apply
   ``from-T1w_to-MNI`` as [xfm.nii.gz, xfm.mat] and ``from-MNI_to-T1w`` as [xfm.mat, xfm.nii.gz]
   (see ``neurohybrid.preprocessing.transforms``).

2. Lesion masks and perfusion to the model grid (glioma, stroke; after ``align`` and ``anat``)::

     neurohybrid preprocess lesions --bids B --subject S --out O [--model-voxel-mm 2]

   reads   O/sub-S/anat/* transforms from step 1, the step-0 transforms, and for every session SES:
           B/derivatives/lesions/sub-S/ses-SES/anat/sub-S_ses-SES_[space-<x>_]desc-{T1Gd,FLAIR,infarct}_mask.nii.gz
           B/sub-S/ses-SES/perf/sub-S_ses-SES_cbf.nii.gz   (when present)
           A mask is on the grid of the image it was drawn on (its affine says which; the space-
           entity breaks ties or names the image when the grid is its own) and goes to the model
           grid through [T1w -> template, that image's from-<x>_to-T1w] in one linear
           interpolation, thresholded at 0.5.
   writes  O/sub-S/ses-SES/anat/sub-S_ses-SES_space-MNI152NLin2009cSym_res-model_desc-<lesion>_mask.nii.gz
           O/sub-S/ses-SES/perf/sub-S_ses-SES_space-MNI152NLin2009cSym_res-model_cbf.nii.gz
   Errors if the subject has neither lesion masks nor CBF.

3. Regional tau PET (Alzheimer's; after ``anat``)::

     neurohybrid preprocess pet --bids B --subject S --out O

   reads   O/sub-S/anat/sub-S_atlas-DK_dseg.nii.gz, sub-S_label-cerebellumGM_mask.nii.gz, and every
           B/sub-S/ses-SES/pet/sub-S_ses-SES_trc-<tracer>_pet.nii.gz (any grid: resampled onto the
           T1w through its step-0 transform, linear)
   writes  O/sub-S/ses-SES/pet/sub-S_ses-SES_atlas-DK_desc-suvr_pet.tsv   (region, suvr), one row
           per DK region (canonical names), mean uptake / mean uptake in cerebellar GM.

4. Structural connectome (every subject; after ``anat``)::

     neurohybrid preprocess connectome --bids B --subject S --out O [--method auto|dipy|mrtrix|normative]
                                       [--normative-csv FILE] [--fast] [--threads N]

   reads   O/sub-S/anat/sub-S_atlas-DK_dseg.nii.gz, sub-S_label-WM_probseg.nii.gz,
           B/sub-S/ses-*/dwi/sub-S_ses-*_dwi.{nii.gz,bval,bvec} (first session that has DWI; any grid:
           the T1w labels go to the DWI grid through the inverse of its step-0 transform)
   writes  O/sub-S/dwi/sub-S_atlas-DK_connectivity.tsv  (square, header = canonical region names,
           streamline counts; normative: tvb-data DK-68 weights, zero rows for subcortical regions)
           O/sub-S/dwi/sub-S_atlas-DK_connectivity.json (Source: dwi-dipy | dwi-mrtrix | normative,
           plus mean streamline lengths in mm under MeanLengthMm for DWI sources)
   ``auto``: dipy when the subject has DWI, else normative (or --normative-csv, a square CSV/TSV
   with region names in the header).

5. Alzheimer's subjects with regional SUVR tables instead of PET images (instead of 1-4)::

     neurohybrid preprocess regional --bids B --subject S --out O [--mapping FILE]

   reads   B/derivatives/regional/sub-S/sub-S_desc-suvr_pet.tsv (session_id, region, suvr[, volume_mm3])
           or B/derivatives/regional/sub-S/ses-X/pet/sub-S_ses-X_desc-suvr_pet.tsv (region, suvr[, volume_mm3]);
           FILE: TSV (source, region) from the tables' region names to the atlas's
   writes  what steps 1, 3 and 4 write for the model inputs: regional SUVR per visit, regional
           volumes (the table's volume_mm3, else the atlas's), the normative connectome
           (neurohybrid.preprocessing.regional).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from neurohybrid.errors import InputError


def _check(args) -> None:
    """Arguments every step relies on, checked before any work (a step may run for minutes)."""
    if not Path(args.bids).is_dir():
        raise InputError("--bids is not a folder (the raw BIDS root)", file=args.bids)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError("--out is a file; it must be the derivatives folder (e.g. results/preproc)", file=args.out)
    voxel = getattr(args, "model_voxel_mm", None)
    if voxel is not None and not (math.isfinite(voxel) and 0.5 <= voxel <= 8.0):
        raise InputError(f"--model-voxel-mm must lie in [0.5, 8] mm, got {voxel:g}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")


def _scratch(args, step: str):
    """The job's temporaries (ours and the libraries') under <out>/.work, removed when it ends."""
    from neurohybrid.io.workdir import job_workdir

    sub = str(args.subject).removeprefix("sub-")
    return job_workdir(args.out, f"{step}-sub-{sub}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bids", required=True, help="raw BIDS root")
    p.add_argument("--subject", required=True, help="subject label, with or without 'sub-'")
    p.add_argument("--out", required=True, help="derivatives root (results/preproc)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("preprocess", help="registration, segmentation, parcellation, PET, connectome")
    sub = parser.add_subparsers(dest="preprocess_command", required=True, metavar="STEP")

    p = sub.add_parser("align", help="rigid within-subject alignment of every session's images to the first T1w, QC")
    _common(p)
    p.add_argument("--fast", action="store_true", help="coarse registration levels only (tests, demo)")
    p.add_argument("--backend", choices=["ants", "fsl"], default="ants")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_run_align)

    p = sub.add_parser("anat", help="N4, brain extraction, registration to MNI, segmentation, parcellation, QC")
    _common(p)
    p.add_argument("--model-voxel-mm", type=float, default=2.0)
    p.add_argument("--fast", action="store_true", help="short registration schedule (tests)")
    p.add_argument("--backend", choices=["ants", "fsl"], default="ants")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--session", default=None, help="session whose T1w is used (default: first)")
    p.add_argument("--no-lesion-masking", dest="lesion_masking", action="store_false",
                   help="register and segment without excluding the lesion masks from the cost")
    p.set_defaults(func=_run_anat)

    p = sub.add_parser("lesions", help="lesion masks and CBF of every session -> template grid at model resolution")
    _common(p)
    p.add_argument("--model-voxel-mm", type=float, default=2.0)
    p.set_defaults(func=_run_lesions)

    p = sub.add_parser("pet", help="regional PET SUVR (DK regions, cerebellar GM reference)")
    _common(p)
    p.set_defaults(func=_run_pet)

    p = sub.add_parser("regional", help="Alzheimer's regional SUVR tables (no PET images) -> the derivatives the model inputs read")
    _common(p)
    p.add_argument("--mapping", default=None, help="TSV (source, region): the tables' region names -> atlas region names")
    p.set_defaults(func=_run_regional)

    p = sub.add_parser("connectome", help="structural connectome from DWI (dipy/MRtrix3) or normative")
    _common(p)
    p.add_argument("--method", choices=["auto", "dipy", "mrtrix", "normative"], default="auto")
    p.add_argument("--normative-csv", default=None)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_run_connectome)


def _run_align(args) -> int:
    _check(args)
    from neurohybrid.preprocessing.align import run_align

    with _scratch(args, "align"):
        run_align(args.bids, args.subject, args.out, fast=args.fast, backend=args.backend, threads=args.threads)
    return 0


def _run_anat(args) -> int:
    _check(args)
    from neurohybrid.preprocessing.pipeline import run_anat

    with _scratch(args, "anat"):
        run_anat(args.bids, args.subject, args.out, model_voxel_mm=args.model_voxel_mm, fast=args.fast,
                 backend=args.backend, threads=args.threads, session=args.session,
                 lesion_masking=args.lesion_masking)
    return 0


def _run_lesions(args) -> int:
    _check(args)
    from neurohybrid.preprocessing.pipeline import run_lesions

    with _scratch(args, "lesions"):
        run_lesions(args.bids, args.subject, args.out, model_voxel_mm=args.model_voxel_mm)
    return 0


def _run_pet(args) -> int:
    _check(args)
    from neurohybrid.preprocessing.pipeline import run_pet

    with _scratch(args, "pet"):
        run_pet(args.bids, args.subject, args.out)
    return 0


def _run_regional(args) -> int:
    _check(args)
    from neurohybrid.preprocessing.regional import run_regional

    run_regional(args.bids, args.subject, args.out, mapping=args.mapping)
    return 0


def _run_connectome(args) -> int:
    _check(args)
    from neurohybrid.preprocessing.pipeline import run_connectome

    with _scratch(args, "connectome"):
        run_connectome(args.bids, args.subject, args.out, method=args.method, normative_csv=args.normative_csv,
                       fast=args.fast, threads=args.threads)
    return 0
