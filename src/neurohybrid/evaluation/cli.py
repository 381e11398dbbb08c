"""`neurohybrid evaluate`: one subject's forecast of one model family -> tidy metrics TSV."""

from __future__ import annotations

from neurohybrid.disorders import DISORDERS

# scipy, pandas and nibabel are imported when the command runs, not when the CLI is built:
# every workflow job pays the CLI's start-up


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score one subject's forecast against its held-out last session",
        description="Writes tidy rows (subject, disorder, model, metric, value).",
    )
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--subject", required=True, help="subject id, with or without 'sub-'")
    p.add_argument("--model", required=True, help="model family, e.g. mechanistic")
    p.add_argument("--forecast-dir", required=True, help="results/forecasts/sub-S")
    p.add_argument("--target", required=True, help="targets root, results/targets")
    p.add_argument("--truth", default=None, help="ground-truth root (results/groundtruth); optional")
    p.add_argument("--out", required=True, help="metrics TSV to write")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from neurohybrid.evaluation.scoring import evaluate_subject
    from neurohybrid.io import write_tsv

    frame = evaluate_subject(args.disorder, args.subject, args.model, args.forecast_dir, args.target, args.truth)
    write_tsv(args.out, frame)
    return 0
