"""`neurohybrid evaluate`: one subject's forecasts of its model families -> one tidy metrics TSV."""

from __future__ import annotations

from neurohybrid.disorders import DISORDERS

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
    p.add_argument("--out", required=True, help="metrics TSV to write")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    import pandas as pd

    from neurohybrid.evaluation.scoring import evaluate_subject
    from neurohybrid.io import write_tsv

    models = [m for m in args.model.split(",") if m]
    frames = [evaluate_subject(args.disorder, args.subject, m, args.forecast_dir, args.target, args.truth) for m in models]
    write_tsv(args.out, pd.concat(frames, ignore_index=True))
    return 0
