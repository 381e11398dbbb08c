"""What cost-function masking buys on patients with lesions (issue 16): structural preprocessing of
virtual glioma patients (visible tumour, necrotic core, mass effect) with and without the lesion
masks excluded from the registration metric, scored against the generator's truth (prints JSON).

    .venv/bin/python benchmarks/bench_lesion_masking.py                    # 4 patients, 2 mm, full schedule
    .venv/bin/python benchmarks/bench_lesion_masking.py --n 2 --fast --json out.json
    .venv/bin/python benchmarks/bench_lesion_masking.py --existing results   # score a finished run
                                                                             # (e.g. the demo), every subject

Scores, per patient and condition, on the first session (the one preprocessing registers):
- tissue Dice (GM, WM: probseg > 0.5 against the truth's) outside the lesion, i.e. in the truth
  brain minus the first session's lesion masks dilated by ``--margin-mm``;
- mean DK-region Dice, same region;
- registration error: for every subject voxel, the template point the estimated transforms give
  against the truth warp's (template point = subject point + d), in mm; mean and 95th percentile
  within ``--near-mm`` of the lesion (outside it) and elsewhere in the brain. The estimated point
  comes from warping images of the template's world coordinates into the subject through the
  inverse transforms, the path every atlas label takes (linear interpolation of a linear field is
  exact).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def dice(a, b) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else float("nan")


def estimated_template_points(d, t1) -> np.ndarray:
    """(X, Y, Z, 3) template world points of the subject's voxels through the estimated transforms."""
    from neurohybrid.anatomy.templates import load_template
    from neurohybrid.preprocessing import ants_backend as ab

    tpl = load_template("t1", 2.0)  # a linear field: any grid covering the brain gives the same points
    ijk = np.indices(tpl.shape, dtype=np.float32).reshape(3, -1)
    world = (tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3:]).reshape((3,) + tpl.shape)
    return np.stack([ab.apply(ab.to_ants(nib.Nifti1Image(world[k], tpl.affine)), t1, d.inverse_transforms,
                              invert=ab.INVERSE_INVERT).numpy() for k in range(3)], axis=-1)


def score(bids: Path, truth: Path, out: Path, sub: str, *, margin_mm: float, near_mm: float) -> dict:
    import ants

    from neurohybrid.preprocessing import layout
    from neurohybrid.preprocessing.layout import Derivatives

    g = lambda p: np.asarray(nib.load(str(p)).dataobj)  # noqa: E731
    t = truth / f"sub-{sub}"
    ses = layout.sessions(bids, sub)[0]
    ref = nib.load(str(layout.raw_t1w(bids, sub, ses)))
    vox = float(np.mean(ref.header.get_zooms()[:3]))
    lesion = np.zeros(ref.shape, bool)
    for path in layout.raw_lesions(bids, sub, ses).values():  # the generator writes them on the T1w grid
        lesion |= g(path) > 0.5
    brain = g(t / f"sub-{sub}_desc-brain_mask.nii.gz") > 0
    dist = ndimage.distance_transform_edt(~lesion, sampling=ref.header.get_zooms()[:3])
    outside = brain & (dist > margin_mm)
    near, far = outside & (dist <= near_mm), outside & (dist > near_mm)

    d = Derivatives(out, sub)
    res = {"lesion_ml": round(float(lesion.sum()) * vox**3 / 1000, 1)}
    for tissue in ("GM", "WM"):
        true = g(t / f"sub-{sub}_label-{tissue}_desc-truth_probseg.nii.gz") > 0.5
        res[f"dice_{tissue}_outside"] = round(dice((g(d.probseg(tissue)) > 0.5) & outside, true & outside), 4)
    dk, tdk = g(d.dseg).astype(int), g(t / f"sub-{sub}_atlas-DK_dseg.nii.gz").astype(int)
    ids = [i for i in np.unique(tdk[outside]) if i > 0]
    res["dice_DK_outside"] = round(float(np.mean([dice((dk == i) & outside, (tdk == i) & outside) for i in ids])), 4)

    ijk = np.indices(ref.shape, dtype=np.float64).reshape(3, -1)
    world = (ref.affine[:3, :3] @ ijk + ref.affine[:3, 3:]).T.reshape(ref.shape + (3,))
    true_pts = world + g(t / f"sub-{sub}_from-MNI152NLin2009cSym_to-T1w_desc-truth_warp.nii.gz").reshape(ref.shape + (3,))
    est = estimated_template_points(d, ants.image_read(str(d.preproc_t1w)))
    err = np.linalg.norm(est - true_pts, axis=-1)
    for name, region in (("near", near), ("far", far)):
        if not region.any():  # no lesion: nothing is near one
            continue
        res[f"reg_error_{name}_mean_mm"] = round(float(err[region].mean()), 3)
        res[f"reg_error_{name}_p95_mm"] = round(float(np.percentile(err[region], 95)), 3)
    return res


def score_existing(results: Path, args) -> None:
    """Every subject of a finished run, as preprocessed there (lesion masking as configured)."""
    bids, truth, out = results / "sourcedata" / "bids", results / "groundtruth", results / "preproc"
    rows = [{"subject": p.name[4:], **score(bids, truth, out, p.name[4:], margin_mm=args.margin_mm, near_mm=args.near_mm)}
            for p in sorted(bids.glob("sub-*")) if p.is_dir()]
    summary = {}
    for disorder in sorted({"".join(c for c in r["subject"] if not c.isdigit()) for r in rows}):
        sel = [r for r in rows if r["subject"].rstrip("0123456789") == disorder]
        keys = [k for k in sel[0] if k != "subject" and all(k in r for r in sel)]
        summary[disorder] = {k: round(float(np.median([r[k] for r in sel])), 4) for k in keys}
    text = json.dumps({"benchmark": "preprocessing accuracy of a finished run", "results": str(results),
                       "margin_mm": args.margin_mm, "near_mm": args.near_mm, "median": summary, "rows": rows}, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4, help="glioma patients")
    ap.add_argument("--voxel-mm", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--fast", action="store_true", help="short registration schedule (the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--margin-mm", type=float, default=4.0, help="lesion dilation excluded from the scores")
    ap.add_argument("--near-mm", type=float, default=15.0, help="'near the lesion': within this of its edge")
    ap.add_argument("--json", default=None)
    ap.add_argument("--existing", default=None, metavar="RESULTS",
                    help="score the preprocessing of a finished run instead (its sourcedata/bids, groundtruth, preproc)")
    args = ap.parse_args(argv)
    if args.existing:
        return score_existing(Path(args.existing), args)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    from neurohybrid.preprocessing.align import run_align
    from neurohybrid.preprocessing.pipeline import run_anat
    from neurohybrid.synth.cohort import generate_cohort

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nh-masking-") as tmp:
        tmp = Path(tmp)
        bids, truth = tmp / "bids", tmp / "truth"
        generate_cohort(bids, truth, glioma=args.n, voxel_mm=args.voxel_mm, seed=args.seed)
        subjects = sorted(p.name[4:] for p in bids.glob("sub-*") if p.is_dir())
        rows = []
        for sub in subjects:
            masked, unmasked = tmp / "masked", tmp / "unmasked"
            run_align(bids, sub, masked, fast=args.fast, threads=args.threads)
            shutil.copytree(masked / f"sub-{sub}", unmasked / f"sub-{sub}")
            for name, out, flag in (("masked", masked, True), ("unmasked", unmasked, False)):
                run_anat(bids, sub, out, model_voxel_mm=2.0, fast=args.fast, threads=args.threads, lesion_masking=flag)
                rows.append({"subject": sub, "condition": name,
                             **score(bids, truth, out, sub, margin_mm=args.margin_mm, near_mm=args.near_mm)})
                print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if k not in ("subject", "condition", "lesion_ml")]
    summary = {}
    for name in ("masked", "unmasked"):
        sel = [r for r in rows if r["condition"] == name]
        summary[name] = {k: round(float(np.median([r[k] for r in sel])), 4) for k in keys}
    paired = {k: [round(a[k] - b[k], 4) for a, b in zip([r for r in rows if r["condition"] == "masked"],
                                                          [r for r in rows if r["condition"] == "unmasked"])]
              for k in keys}
    result = {"benchmark": "cost-function masking on virtual glioma patients", "n": len(subjects),
              "voxel_mm": args.voxel_mm, "schedule": "fast" if args.fast else "full", "seed": args.seed,
              "margin_mm": args.margin_mm, "near_mm": args.near_mm, "median": summary,
              "masked_minus_unmasked": paired, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
