"""`neurohybrid cohort table|stats|figures`: cohort-level tables and figures (results/cohort/)."""

from __future__ import annotations

from pathlib import Path

from neurohybrid.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser("cohort", help="cohort tables, statistics and figures")
    sub = p.add_subparsers(dest="cohort_command", required=True, metavar="ACTION")

    t = sub.add_parser("table", help="concatenate per-subject metrics TSVs into one tidy table")
    t.add_argument("inputs", nargs="*", help="metrics TSVs (results/metrics/sub-*/sub-*_metrics.tsv)")
    t.add_argument("--metrics-dir", default=None, help="also take every *_metrics.tsv under this folder")
    t.add_argument("--out", required=True, help="results/cohort/metrics.tsv")
    t.set_defaults(func=_table)

    s = sub.add_parser("stats", help="summary (mean, bootstrap CI, n missing), primary paired tests (Wilcoxon, Holm) "
                                     "and a sample-size note",
                       description="The analysis plan (primary metric per disorder, alpha, Holm scope, interval, seed) "
                                   "is the config's 'analysis:' section and 'seed' (defaults: config/config.yaml).")
    s.add_argument("--metrics", required=True, help="results/cohort/metrics.tsv")
    s.add_argument("--config", default=None, help="resolved workflow config (results/config.yaml); optional")
    s.add_argument("--summary-out", required=True, help="results/cohort/summary.tsv")
    s.add_argument("--stats-out", required=True, help="results/cohort/stats.tsv")
    s.add_argument("--power-out", default=None, help="results/cohort/power.tsv (subjects needed for the planned power)")
    s.set_defaults(func=_stats)

    f = sub.add_parser("figures", help="PNG figures into a folder")
    f.add_argument("--metrics", required=True, help="results/cohort/metrics.tsv")
    f.add_argument("--forecasts", default=None, help="results/forecasts (for overlays and parameter recovery)")
    f.add_argument("--targets", default=None, help="results/targets")
    f.add_argument("--truth", default=None, help="results/groundtruth (parameter recovery), optional")
    f.add_argument("--models", default=None, help="results/models (training curves of the fold models), optional")
    f.add_argument("--stats", default=None, help="results/cohort/stats.tsv (primary comparisons), optional")
    f.add_argument("--out-dir", required=True, help="results/cohort/figures")
    f.set_defaults(func=_figures)


def _table(args) -> int:
    paths = [Path(p) for p in args.inputs]
    if args.metrics_dir:
        found = sorted(Path(args.metrics_dir).rglob("*_metrics.tsv"))
        paths += [p for p in found if p not in paths]
    if not paths:
        raise InputError("no metrics TSVs given or found", file=args.metrics_dir)
    from neurohybrid.evaluation.statistics import collect_metrics
    from neurohybrid.io import write_tsv

    write_tsv(args.out, collect_metrics(paths))
    return 0


def _read_config(path) -> dict:
    import yaml

    if path is None:
        return {}
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read config ({type(exc).__name__}: {exc})", file=path) from None
    if not isinstance(config, dict):
        raise InputError("config must be a mapping", file=path)
    return config


def _stats(args) -> int:
    from neurohybrid.evaluation import analysis
    from neurohybrid.evaluation.statistics import paired_tests, power_table, read_metrics, summarise
    from neurohybrid.io import write_tsv

    plan = analysis.plan(_read_config(args.config))
    frame = read_metrics(args.metrics)
    write_tsv(args.summary_out, summarise(frame, plan))
    write_tsv(args.stats_out, paired_tests(frame, plan))
    if args.power_out:
        write_tsv(args.power_out, power_table(frame, plan))
    return 0


def _figures(args) -> int:
    from neurohybrid.report.figures import write_all  # matplotlib only when figures are asked for

    from neurohybrid.evaluation.statistics import read_metrics, read_stats

    stats = read_stats(args.stats) if args.stats else None
    write_all(read_metrics(args.metrics), args.out_dir, args.forecasts, args.targets, args.truth, args.models, stats)
    return 0
