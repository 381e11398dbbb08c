"""`neurohybrid synth`: write the virtual cohort (raw BIDS + separate ground truth)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the virtual cohort (raw BIDS + ground truth)",
        description="Generate virtual glioma, Alzheimer's and stroke patients on the MNI152 2009c template "
                    "(random diffeomorphic warps, bias field, noise) as a raw BIDS dataset; ground truth "
                    "(warps, parameters, full fields) goes to a separate folder.",
    )
    p.add_argument("--out", required=True, help="BIDS output folder")
    p.add_argument("--truth-out", required=True, help="ground-truth folder (outside --out)")
    p.add_argument("--glioma", type=int, default=0, help="number of glioma subjects")
    p.add_argument("--alzheimer", type=int, default=0, help="number of Alzheimer's subjects")
    p.add_argument("--stroke", type=int, default=0, help="number of stroke subjects")
    p.add_argument("--voxel-mm", type=float, default=2.0, help="isotropic voxel size (mm), default 2")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--dwi-subjects", type=int, default=0, help="Alzheimer's subjects (the first K) that also get DWI")
    p.add_argument("--sloppy", action="store_true", help="fast mode for tests: 4 mm grid")
    p.add_argument("--glioma-treated-every", type=int, default=2,
                   help="every k-th glioma patient gets radiotherapy between sessions (default 2; 0: none)")
    p.add_argument("--jobs", type=int, default=1, help="subjects generated in parallel (output bytes do not depend on it)")
    p.set_defaults(func=run)


def run(args) -> int:
    from neurohybrid.synth.cohort import generate_cohort

    summary = generate_cohort(args.out, args.truth_out, glioma=args.glioma, alzheimer=args.alzheimer,
                              stroke=args.stroke, voxel_mm=args.voxel_mm, seed=args.seed,
                              dwi_subjects=args.dwi_subjects, sloppy=args.sloppy, jobs=args.jobs,
                              glioma_treated_every=args.glioma_treated_every)
    print(json.dumps({"subjects": summary["subjects"], "voxel_mm": summary["voxel_mm"],
                      "seconds": round(summary["seconds"], 1)}))
    return 0
