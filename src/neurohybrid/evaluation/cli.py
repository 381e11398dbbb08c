"""`neurohybrid evaluate`: one subject's forecasts of its model families -> one tidy metrics TSV."""

from __future__ import annotations

from pathlib import Path

from neurohybrid.disorders import DISORDERS
from neurohybrid.errors import InputError

# scipy, pandas and nibabel are imported when the command runs, not when the CLI is built:
# every workflow job pays the CLI's start-up


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score one subject's forecasts against its held-out last session",
        description="Writes tidy rows (subject, disorder, model, metric, value).",
    )
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--subject", required=True, help="subject id, with or without 'sub-'")
    p.add_argument("--model", required=True, help="comma-separated model families, e.g. persistence,mechanistic")
    p.add_argument("--forecast-dir", required=True, help="results/forecasts/sub-S")
    p.add_argument("--target", required=True, help="targets root, results/targets")
    p.add_argument("--truth", default=None, help="ground-truth root (results/groundtruth); optional")
    p.add_argument("--plan-dir", default=None,
                   help="glioma: the subject's treatment plans (results/plans/sub-S); adds the coverage of each "
                        "radiotherapy target by the held-out tumour (ctv_coverage_flair / _t1gd)")
    p.add_argument("--out", required=True, help="metrics TSV to write")
    p.set_defaults(func=_evaluate)


def _families(text: str) -> list[str]:
    """The --model list: known family names, each once (a repeated name would duplicate rows)."""
    from neurohybrid.registry import FAMILY_NAMES

    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise InputError(f"--model names no model family (one or more of {', '.join(FAMILY_NAMES)})")
    unknown = [m for m in models if m not in FAMILY_NAMES]
    if unknown:
        raise InputError(f"--model: unknown family {', '.join(unknown)} (known: {', '.join(FAMILY_NAMES)})")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise InputError(f"--model names {', '.join(repeated)} more than once")
    return models


def _evaluate(args) -> int:
    import pandas as pd

    from neurohybrid.evaluation.scoring import evaluate_subject, plan_coverage
    from neurohybrid.io import write_tsv

    models = _families(args.model)
    if args.truth is not None and not Path(args.truth).is_dir():
        raise InputError("--truth is not a folder (the ground-truth root, e.g. results/groundtruth)", file=args.truth)
    frames = [evaluate_subject(args.disorder, args.subject, m, args.forecast_dir, args.target, args.truth) for m in models]
    if args.plan_dir:
        if args.disorder != "glioma":
            raise InputError(f"--plan-dir: only glioma plans are scored against the held-out session, not {args.disorder}")
        frames.append(plan_coverage(args.subject, args.plan_dir, args.target))
    write_tsv(args.out, pd.concat(frames, ignore_index=True))
    return 0
