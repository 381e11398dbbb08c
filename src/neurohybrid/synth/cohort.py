"""Generate the virtual cohort: raw BIDS in one folder, ground truth in another.

Every subject has its own random stream, ``SeedSequence([seed, disorder, index])``, so a
subject's data do not depend on how many subjects of other disorders are generated, nor on the
order or process they are generated in, and the same seed gives the same bytes.

Parallelism is across subjects (``jobs`` worker processes); inside a subject every solver, BLAS
and Numba call runs on one thread: the per-subject problems are small, and nested thread pools
on a shared machine cost far more than they give (measured: 4x slower wall time with default
BLAS/Numba threading on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from neurohybrid.disorders import DISORDERS
from neurohybrid.errors import InputError
from neurohybrid.io import atomic_path, write_json
from neurohybrid.synth import bids
from neurohybrid.synth.anatomy import make_subject_anatomy

log = logging.getLogger(__name__)

ID_PREFIX = {"glioma": "glioma", "alzheimer": "ad", "stroke": "stroke"}
SLOPPY_VOXEL_MM = 4.0
TEMPLATE_SPACE = "MNI152NLin2009cSym"


def subject_ids(disorder: str, n: int) -> list[str]:
    return [f"{ID_PREFIX[disorder]}{i + 1:02d}" for i in range(n)]


def _check_apart(out: Path, truth: Path) -> None:
    a, b = out.resolve(), truth.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise InputError(f"ground truth folder {truth} must lie outside the BIDS folder {out} (and vice versa)",
                         file=truth)


def _check_not_foreign(out: Path) -> None:
    desc = out / "dataset_description.json"
    if desc.exists():
        try:
            meta = json.loads(desc.read_text())
        except (OSError, ValueError):
            meta = {}
        names = [g.get("Name") for g in meta.get("GeneratedBy", []) if isinstance(g, dict)]
        if "neurohybrid synth" not in names:
            raise InputError("output folder holds a BIDS dataset not written by neurohybrid synth; refusing to overwrite",
                             file=desc)


def _write_truth_common(subject: str, disorder: str, anat, truth_dir: Path, disease_params: dict) -> None:
    sub = truth_dir / f"sub-{subject}"
    aff = anat.affine
    bids.write_image(sub / f"sub-{subject}_from-{TEMPLATE_SPACE}_to-T1w_desc-truth_warp.nii.gz",
                     np.asarray(anat.warp.displacement_image().dataobj), aff)
    for label, data in (("GM", anat.gm), ("WM", anat.wm), ("CSF", anat.csf)):
        bids.write_image(sub / f"sub-{subject}_label-{label}_desc-truth_probseg.nii.gz", data, aff)
    bids.write_mask(sub / f"sub-{subject}_desc-brain_mask.nii.gz", anat.brain, aff)
    bids.write_image(sub / f"sub-{subject}_atlas-DK_dseg.nii.gz", anat.atlas, aff, dtype=np.int16)
    bids.write_mask(sub / f"sub-{subject}_desc-cerebellum_mask.nii.gz", anat.cerebellum, aff)
    write_json(sub / f"sub-{subject}_desc-truth_params.json", {
        "subject": subject,
        "disorder": disorder,
        "voxel_mm": anat.voxel_mm,
        "warp_convention": "displacement d on the subject grid (RAS mm): template point = subject world point + d",
        "anatomy": anat.params,
        "disease": disease_params,
    })


def treated_after_session(index: int, every: int) -> int | None:
    """Which glioma patients get radiotherapy, and after which session (0-based): every ``every``-th
    patient (index every-1, 2 every-1, ...; 0: none), alternately after the first session (the
    fit sees the treatment) and after the second (it falls in the forecast gap)."""
    if every <= 0 or index % every != every - 1:
        return None
    return (index // every) % 2


def generate_subject(disorder: str, index: int, *, bids_dir: Path, truth_dir: Path, voxel_mm: float, seed: int,
                     dwi: bool = False, glioma_treated_every: int = 2) -> dict:
    """Generate and write one subject; returns its participants.tsv row."""
    from threadpoolctl import threadpool_limits  # comes with nilearn's scikit-learn

    with threadpool_limits(limits=1):
        return _generate_subject(disorder, index, bids_dir=bids_dir, truth_dir=truth_dir, voxel_mm=voxel_mm, seed=seed,
                                 dwi=dwi, treated_every=glioma_treated_every)


def _generate_subject(disorder, index, *, bids_dir, truth_dir, voxel_mm, seed, dwi, treated_every=2):
    from neurohybrid.synth import alzheimer, glioma, stroke

    subject = f"{ID_PREFIX[disorder]}{index + 1:02d}"
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), DISORDERS.index(disorder), int(index)]))
    anat = make_subject_anatomy(subject, voxel_mm, rng)
    row = {"participant_id": f"sub-{subject}", "disorder": disorder,
           "age": float(np.round(rng.uniform(*{"glioma": (30, 70), "alzheimer": (60, 85), "stroke": (50, 85)}[disorder]))),
           "sex": str(rng.choice(["F", "M"])), "onset_to_reperfusion_h": None}
    if disorder == "glioma":
        # the treatment has its own stream (a fourth key): the subject's main stream, and so its
        # anatomy, growth and noise draws, are the same treated or not
        after = treated_after_session(index, int(treated_every))
        t_rng = np.random.default_rng(np.random.SeedSequence([int(seed), DISORDERS.index(disorder), int(index), 1]))
        # the truth anatomy is the first session's, displaced by that session's mass effect
        params, anat = glioma.write_subject(subject, anat, rng, bids_dir, truth_dir, treatment_rng=t_rng,
                                            treat_after_session=after)
    elif disorder == "alzheimer":
        params, anat = alzheimer.write_subject(subject, anat, rng, bids_dir, truth_dir, dwi=dwi)  # first visit's anatomy
    else:
        params = stroke.write_subject(subject, anat, rng, bids_dir, truth_dir)
        row["onset_to_reperfusion_h"] = params["onset_to_reperfusion_h"]
    _write_truth_common(subject, disorder, anat, truth_dir, params)
    return row


def generate_cohort(out, truth_out, *, glioma: int = 0, alzheimer: int = 0, stroke: int = 0, voxel_mm: float = 2.0,
                    seed: int = 0, dwi_subjects: int = 0, sloppy: bool = False, jobs: int = 1,
                    glioma_treated_every: int = 2) -> dict:
    """Write the virtual cohort: raw BIDS under ``out``, ground truth under ``truth_out``.

    dwi_subjects: how many Alzheimer subjects (the first ones) also get DWI at their first visit.
    sloppy: coarse 4 mm grid for tests (voxel_mm is raised to 4). jobs: worker processes (subjects
    in parallel; the bytes do not depend on it). glioma_treated_every: every k-th glioma patient gets
    radiotherapy (``treated_after_session``; 0: nobody). Returns a summary dict.
    """
    out, truth_out = Path(out), Path(truth_out)
    counts = {"glioma": int(glioma), "alzheimer": int(alzheimer), "stroke": int(stroke)}
    if any(n < 0 or n > 99 for n in counts.values()):
        raise InputError(f"subject counts must lie in 0..99, got {counts}")
    if sum(counts.values()) == 0:
        raise InputError("no subjects requested (give --glioma, --alzheimer or --stroke)")
    if not (0 <= int(dwi_subjects) <= counts["alzheimer"]):
        raise InputError(f"--dwi-subjects must lie in 0..{counts['alzheimer']} (the Alzheimer subjects)")
    if not (0.5 <= float(voxel_mm) <= 8.0):
        raise InputError(f"voxel size must lie in 0.5..8 mm, got {voxel_mm}")
    voxel_mm = max(float(voxel_mm), SLOPPY_VOXEL_MM) if sloppy else float(voxel_mm)
    _check_apart(out, truth_out)
    _check_not_foreign(out)
    start = time.perf_counter()
    tasks = [(disorder, i, disorder == "alzheimer" and i < int(dwi_subjects))
             for disorder in DISORDERS for i in range(counts[disorder])]
    if int(glioma_treated_every) < 0:
        raise InputError(f"--glioma-treated-every must be >= 0, got {glioma_treated_every}")
    kwargs = dict(bids_dir=out, truth_dir=truth_out, voxel_mm=voxel_mm, seed=seed, glioma_treated_every=int(glioma_treated_every))
    if int(jobs) <= 1 or len(tasks) == 1:
        rows = []
        for disorder, i, dwi in tasks:
            t0 = time.perf_counter()
            rows.append(generate_subject(disorder, i, dwi=dwi, **kwargs))
            log.info("generated %s in %.1f s", rows[-1]["participant_id"], time.perf_counter() - t0)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a process that has already run Numba's threaded kernels must not fork
        # (its thread pool does not survive it); each worker loads the templates once
        with ProcessPoolExecutor(max_workers=int(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(generate_subject, disorder, i, dwi=dwi, **kwargs) for disorder, i, dwi in tasks]
            rows = [f.result() for f in futures]
    bids.write_dataset_description(out, "neurohybrid virtual cohort")
    with atomic_path(out / ".bidsignore") as tmp:
        tmp.write_text(bids.BIDSIGNORE)
    with atomic_path(out / "README") as tmp:
        tmp.write_text(
            "Virtual cohort generated by `neurohybrid synth`: subjects are the MNI152 2009c template under random\n"
            "smooth diffeomorphic warps, with glioma (Fisher-Kolmogorov), Alzheimer's tau PET (network FKPP) and\n"
            "ischaemic stroke (Darcy perfusion + Xue 2021 tissue death) data. Synthetic; no real patient data.\n"
            "Ground truth (warps, parameters, full fields) is kept in a separate folder.\n")
    bids.write_participants(out, rows)
    if counts["glioma"] or counts["stroke"]:
        bids.write_dataset_description(out / "derivatives" / "lesions", "neurohybrid virtual cohort lesion masks",
                                       "derivative")
    # no SourceDatasets path: an absolute path would make the bytes depend on where the cohort is written
    bids.write_dataset_description(truth_out, "neurohybrid virtual cohort ground truth", "derivative")
    write_json(truth_out / "cohort.json", {"seed": int(seed), "voxel_mm": voxel_mm, "counts": counts,
                                           "dwi_subjects": int(dwi_subjects), "sloppy": bool(sloppy),
                                           "glioma_treated_every": int(glioma_treated_every)})
    return {"subjects": [r["participant_id"] for r in rows], "voxel_mm": voxel_mm,
            "seconds": time.perf_counter() - start}
