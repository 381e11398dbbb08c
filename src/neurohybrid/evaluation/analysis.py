"""The pre-registered cohort analysis: what is tested, at which level, with which intervals.

Read from the config's ``analysis:`` section (config/config.yaml; checked here and by the schema)
and fixed before any result is seen, so that the tests cannot be chosen after looking:

- one primary metric per disorder; each model family is compared with each baseline
  (``registry.BASELINES``) and the baselines with each other on it, by a two-sided paired Wilcoxon
  signed-rank test, with Holm's adjustment over those primary comparisons only (per disorder, or
  over all disorders with ``holm_scope: all``);
- every other metric is secondary: an estimate and a bootstrap interval, no test;
- intervals are bootstrap intervals (``scipy.stats.bootstrap``, BCa or percentile), seeded from
  the config's ``seed``.

This module only names metrics and reads settings (no numpy, no scipy): the workflow checks the
section at parse time.
"""

from __future__ import annotations

import dataclasses
import difflib

from neurohybrid.errors import InputError
from neurohybrid.registry import DISORDERS

# What the per-subject scorers (evaluation.scoring) write for each disorder, besides timings and
# parameter recovery. A test checks that the scorers write exactly these.
SCORED_METRICS = {
    "glioma": tuple(f"{m}_{tag}" for tag in ("t1gd", "flair")
                    for m in ("dice", "volume_error_ml", "abs_volume_error_ml", "hd95_mm")),
    "alzheimer": ("rmse_suvr", "pearson_r", "rmse_rel_persistence"),
    "stroke": tuple(f"{m}_infarct" for m in ("dice", "volume_error_ml", "abs_volume_error_ml", "hd95_mm")),
}

# Secondary metrics of the treatment plans (``scoring.plan_coverage``, glioma only): the share of
# the held-out session's tumour inside each family's personalised radiotherapy target and inside the
# standard margin target (model ``standard_margin``), at equal volume. Never a primary metric here.
PLAN_METRICS = {"glioma": ("ctv_coverage_flair", "ctv_coverage_t1gd")}

# +1: higher is better, -1: lower is better. A signed volume error has no better direction, so it
# cannot be a primary metric (its test would not say which family is better).
_HIGHER_IS_BETTER = ("dice_", "pearson_r", "ctv_coverage")


def direction(metric: str) -> int:
    """+1 if a higher value is better, -1 if lower is better, 0 if neither (signed errors)."""
    if metric.startswith("volume_error_ml"):
        return 0
    return 1 if metric.startswith(_HIGHER_IS_BETTER) else -1


# the values config/config.yaml states (a test checks that they agree)
DEFAULTS = {
    "primary_metrics": {"glioma": "dice_flair", "alzheimer": "rmse_suvr", "stroke": "dice_infarct"},
    "alpha": 0.05,
    "holm_scope": "disorder",
    "interval": "bca",
    "confidence": 0.95,
    "resamples": 9999,
    "power": 0.8,
}
HOLM_SCOPES = ("disorder", "all")
INTERVALS = ("bca", "percentile")


@dataclasses.dataclass(frozen=True)
class Plan:
    primary_metrics: dict
    alpha: float
    holm_scope: str
    interval: str
    confidence: float
    resamples: int
    power: float
    seed: int
    # the families the run was configured with (models.families): the planned comparisons are
    # among these, so a family whose every forecast failed still counts in the Holm family
    families: tuple = ()

    def primary(self, disorder: str) -> str | None:
        return self.primary_metrics.get(disorder)


def _fail(key: str, problem: str) -> None:
    raise InputError(f"config key 'analysis.{key}': {problem}")


def check(section: dict | None) -> None:
    """The ``analysis:`` section names known keys, a primary metric with a better direction per
    disorder, and sane levels; an error names the key (the schema checks types as well)."""
    section = section or {}
    for key in section:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), sorted(DEFAULTS), n=1)
            _fail(key, "unknown key" + (f" (did you mean '{close[0]}'?)" if close else ""))
    for disorder, metric in (section.get("primary_metrics") or {}).items():
        if disorder not in DISORDERS:
            _fail(f"primary_metrics.{disorder}", f"unknown disorder (known: {', '.join(DISORDERS)})")
        known = SCORED_METRICS[disorder]
        if metric not in known:
            close = difflib.get_close_matches(str(metric), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
            _fail(f"primary_metrics.{disorder}", f"unknown metric {metric!r}{hint}")
        if direction(metric) == 0:
            _fail(f"primary_metrics.{disorder}", f"{metric!r} is signed (no better direction); use its absolute value")
    for key, lo, hi in (("alpha", 0.0, 0.5), ("confidence", 0.5, 1.0), ("power", 0.5, 1.0)):
        if key in section and not (isinstance(section[key], (int, float)) and lo < float(section[key]) < hi):
            _fail(key, f"must be a number in ({lo}, {hi}), got {section[key]!r}")
    if "holm_scope" in section and section["holm_scope"] not in HOLM_SCOPES:
        _fail("holm_scope", f"must be one of {', '.join(HOLM_SCOPES)}, got {section['holm_scope']!r}")
    if "interval" in section and section["interval"] not in INTERVALS:
        _fail("interval", f"must be one of {', '.join(INTERVALS)}, got {section['interval']!r}")
    resamples = section.get("resamples", DEFAULTS["resamples"])
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 99:
        _fail("resamples", f"must be an integer of at least 99, got {resamples!r}")


def plan(config: dict | None) -> Plan:
    """The analysis plan of a (resolved) workflow config; defaults where the config is silent."""
    config = config or {}
    section = config.get("analysis") or {}
    check(section)
    values = {**DEFAULTS, **section}
    values["primary_metrics"] = {**DEFAULTS["primary_metrics"], **(section.get("primary_metrics") or {})}
    return Plan(primary_metrics=dict(values["primary_metrics"]), alpha=float(values["alpha"]),
                holm_scope=str(values["holm_scope"]), interval=str(values["interval"]),
                confidence=float(values["confidence"]), resamples=int(values["resamples"]),
                power=float(values["power"]), seed=int(config.get("seed", 0) or 0),
                families=tuple((config.get("models") or {}).get("families") or ()))
