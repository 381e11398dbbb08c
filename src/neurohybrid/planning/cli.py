"""`neurohybrid plan glioma|stroke|alzheimer|cohort`: treatment planning from the fitted models.

Per subject, reads its model inputs (earlier sessions only) and the families' forecasts and fit
jsons, never the held-out target or the ground truth, and writes into ``--out-dir``:
``sub-S_desc-plan.tsv`` (subject, disorder, model, measure, value, unit) plus the disorder's
files (glioma CTV masks, stroke reperfusion curves and figure, Alzheimer's regional forecasts and
meta-region curves). ``plan cohort`` gathers the per-subject tables into results/cohort/.
"""

from __future__ import annotations

import time
from pathlib import Path

from neurohybrid.errors import InputError


def _common(args):
    from neurohybrid.disorders.base import SubjectData, inputs_path
    from neurohybrid.disorders.cli import _load_config
    from neurohybrid.planning.settings import resolve

    config = _load_config(args.config)
    settings = resolve(config)
    inputs = SubjectData.load(inputs_path(args.inputs, args.subject), subject=args.subject)
    if inputs.disorder != args.disorder:
        raise InputError(f"model inputs are for {inputs.disorder}, not {args.disorder}",
                         file=inputs_path(args.inputs, args.subject), subject=args.subject)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return config, settings[args.disorder], inputs, out_dir


def _families(config) -> list[str]:
    from neurohybrid.registry import FAMILY_NAMES

    return list((config.get("models") or {}).get("families") or FAMILY_NAMES)


def _write_rows(out_dir: Path, subject: str, disorder: str, rows) -> Path:
    import pandas as pd

    from neurohybrid.io import write_tsv
    from neurohybrid.planning import ROW_COLUMNS

    frame = pd.DataFrame([(subject, disorder, *r) for r in rows], columns=ROW_COLUMNS)
    path = out_dir / f"sub-{subject}_desc-plan.tsv"
    write_tsv(path, frame)
    return path


def cmd_glioma(args) -> int:
    import numpy as np

    from neurohybrid.disorders import voxel
    from neurohybrid.io import load_volume, save_volume
    from neurohybrid.planning import glioma

    start = time.perf_counter()
    config, s, inputs, out_dir = _common(args)
    sub, meta = args.subject, inputs.meta
    offset, size = meta["crop_offset"], inputs.arrays["wm"].shape
    affine = np.asarray(meta["affine"], np.float64)
    densities = {}
    for family, path in glioma.density_families(Path(args.forecast_dir), sub, _families(config)).items():
        data, aff = load_volume(path, subject=sub, value_range=(0.0, 1.0 + 1e-3))
        if list(data.shape) != list(meta["full_shape"]) or not np.allclose(aff, affine, atol=1e-3):
            raise InputError("cell density is not on the model inputs' grid", file=path, subject=sub)
        densities[family] = voxel.crop(data, offset, size)
    # no family with a mechanistic state (e.g. families: [persistence, data_driven]): the standard
    # target alone
    try:
        plan = glioma.plan_subject(inputs, densities, float(s["margin_mm"]))
    except InputError as exc:
        raise exc.with_context(subject=sub) from None
    full = meta["full_shape"]
    save_volume(glioma.ctv_path(out_dir, sub, "standard_margin"), voxel.uncrop(plan["standard"].astype(np.uint8), offset, full), affine)
    for family, mask in plan["personalised"].items():
        save_volume(glioma.ctv_path(out_dir, sub, family), voxel.uncrop(mask.astype(np.uint8), offset, full), affine)
    rows = list(plan["rows"]) + [(m, "planning_seconds", sec, "s") for m, sec in plan["seconds"].items()]
    if args.preproc:
        from neurohybrid.io.atomic import atomic_path

        t_native = time.perf_counter()
        masks = {"standard_margin": plan["standard"], **plan["personalised"]}
        for model, mask in masks.items():
            img = glioma.to_subject_space(voxel.uncrop(mask.astype(np.uint8), offset, full), affine, Path(args.preproc), sub)
            with atomic_path(glioma.ctv_path_t1w(out_dir, sub, model)) as tmp:
                img.to_filename(str(tmp))
            zooms = np.prod(img.header.get_zooms()[:3]) / 1000.0
            rows.append((model, "ctv_volume_t1w", float(np.asarray(img.dataobj).sum()) * float(zooms), "ml"))
        rows.append(("all", "t1w_space_seconds", time.perf_counter() - t_native, "s"))
    rows.append(("all", "plan_job_seconds", time.perf_counter() - start, "s"))
    _write_rows(out_dir, sub, "glioma", rows)
    return 0


def _fits(forecast_dir, subject: str, families, numeric=()) -> dict[str, dict]:
    """Each family's fit json, checked to hold the ``numeric`` parameters the plan uses."""
    from neurohybrid.evaluation.scoring import read_fit_json

    fits = {f: read_fit_json(forecast_dir, subject, f) for f in families}
    for family, fit in fits.items():
        p = fit.get("parameters") or {}
        if not all(isinstance(p.get(k), (int, float)) for k in numeric):
            raise InputError(f"fit json lacks numeric parameters {', '.join(numeric)}", subject=subject,
                             file=Path(forecast_dir) / f"sub-{subject}_model-{family}_desc-fit.json")
    return fits


def cmd_stroke(args) -> int:
    import math

    import pandas as pd

    from neurohybrid.disorders.stroke.mechanistic import settings as stroke_settings
    from neurohybrid.io import write_tsv
    from neurohybrid.planning import stroke

    start = time.perf_counter()
    config, s, inputs, out_dir = _common(args)
    sub = args.subject
    families = [f for f in _families(config) if f in stroke.PLANNED_FAMILIES]
    fits = _fits(args.forecast_dir, sub, families, numeric=("sensitivity",))
    try:
        plan = stroke.plan_subject(inputs, fits, s, stroke_settings(config))
    except InputError as exc:
        raise exc.with_context(subject=sub) from None
    curve = pd.DataFrame(plan["curves"], columns=stroke.CURVE_COLUMNS)
    curve.insert(2, "reperfusion", ["never" if not math.isfinite(t) else "at reperfusion_h" for t in curve["reperfusion_h"]])
    curve.insert(0, "subject", sub)
    curve["horizon_h"] = plan["horizon"]
    write_tsv(out_dir / f"sub-{sub}_desc-reperfusion_curve.tsv", curve)
    t_fig = time.perf_counter()
    stroke.figure(out_dir / f"sub-{sub}_desc-reperfusion_curve.png", sub, plan["curves"], plan)
    rows = list(plan["rows"]) + [(m, "planning_seconds", sec, "s") for m, sec in plan["seconds"].items()]
    rows += [("all", "figure_seconds", time.perf_counter() - t_fig, "s"), ("all", "plan_job_seconds", time.perf_counter() - start, "s")]
    _write_rows(out_dir, sub, "stroke", rows)
    return 0


def cmd_alzheimer(args) -> int:
    import pandas as pd

    from neurohybrid.disorders.alzheimer.model import Subject
    from neurohybrid.disorders.alzheimer.settings import Settings
    from neurohybrid.io import write_tsv
    from neurohybrid.planning import alzheimer

    start = time.perf_counter()
    config, s, inputs, out_dir = _common(args)
    sub = args.subject
    families = [f for f in _families(config) if f in alzheimer.PLANNED_FAMILIES]
    fits = _fits(args.forecast_dir, sub, families, numeric=("kappa", "alpha", "suvr_amplitude"))
    try:
        plan = alzheimer.plan_subject(Subject.from_inputs(inputs), Settings.from_config(config), fits, s,
                                      seed=int(config.get("seed", 0) or 0))
    except InputError as exc:
        raise exc.with_context(subject=sub) from None
    traj = pd.DataFrame(plan["trajectory"], columns=alzheimer.TRAJECTORY_COLUMNS)
    traj.insert(0, "subject", sub)
    write_tsv(out_dir / f"sub-{sub}_desc-tauforecast.tsv", traj)
    curve = pd.DataFrame(alzheimer.curve_rows(plan), columns=alzheimer.CURVE_COLUMNS)
    curve.insert(0, "subject", sub)
    curve["positivity_suvr"] = plan["threshold"]
    write_tsv(out_dir / f"sub-{sub}_desc-metaregion_curve.tsv", curve)
    rows = list(plan["rows"]) + [(m, "planning_seconds", sec, "s") for m, sec in plan["seconds"].items()]
    rows.append(("all", "plan_job_seconds", time.perf_counter() - start, "s"))
    _write_rows(out_dir, sub, "alzheimer", rows)
    return 0


def cmd_cohort(args) -> int:
    from neurohybrid.io import write_tsv
    from neurohybrid.planning import cohort

    table = cohort.collect(args.cohort_disorder, args.plans, args.metrics)
    write_tsv(args.out, table)
    if args.figure:
        if args.cohort_disorder == "glioma":
            cohort.figure_glioma(table, args.figure)
        elif args.cohort_disorder == "stroke":
            cohort.figure_stroke(args.plans, args.figure)
        else:
            cohort.figure_alzheimer(args.plans, args.figure)
    return 0


def _add_subject_args(p, disorder: str) -> None:
    p.add_argument("--subject", required=True, help="subject label without 'sub-'")
    p.add_argument("--inputs", required=True, help="model inputs root (results/inputs)")
    p.add_argument("--forecast-dir", required=True, help="the subject's forecasts (results/forecasts/sub-S)")
    p.add_argument("--config", help="resolved workflow config (YAML; planning: section)")
    p.add_argument("--out-dir", required=True, help="the subject's planning folder (results/plans/sub-S)")
    p.set_defaults(disorder=disorder)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="treatment planning from each family's fitted model",
                              description="Reads only model inputs and forecasts (never the held-out session).")
    sub = p.add_subparsers(dest="plan_command", required=True, metavar="WHAT")
    q = sub.add_parser("glioma", help="radiotherapy CTVs: standard margin and personalised iso-density at equal volume "
                                      "(masks on the model grid; volumes in ml, margin in mm)")
    _add_subject_args(q, "glioma")
    q.add_argument("--preproc", help="preprocessing root (results/preproc): also write the targets in the subject's T1w space")
    q.set_defaults(func=cmd_glioma)
    q = sub.add_parser("stroke", help="final infarct volume (ml) vs onset-to-reperfusion time (h), with the band of the "
                                      "fitted sigma's interval; triage: core, hypoperfused (CBF in ml/100 ml/min) and mismatch")
    _add_subject_args(q, "stroke")
    q.set_defaults(func=cmd_stroke)
    q = sub.add_parser("alzheimer", help="regional SUVR at +2/+5 years with a parameter band, years to meta-region "
                                         "positivity, and the delay bought by lowering production (alpha)")
    _add_subject_args(q, "alzheimer")
    q.set_defaults(func=cmd_alzheimer)
    q = sub.add_parser("cohort", help="one disorder's planning tables gathered (tidy, with units) and its figure")
    q.add_argument("--disorder", dest="cohort_disorder", required=True, choices=("glioma", "stroke", "alzheimer"))
    q.add_argument("plans", nargs="+", help="per-subject planning folders (results/plans/sub-*)")
    q.add_argument("--metrics", help="glioma: results/cohort/metrics.tsv (the coverage rows of the evaluation)")
    q.add_argument("--out", required=True, help="results/cohort/treatment_<disorder>.tsv")
    q.add_argument("--figure", help="PNG (results/cohort/figures/treatment_<disorder>.png)")
    q.set_defaults(func=cmd_cohort)
