"""Parameter recovery: which fitted parameters are scored against the generator's ground truth.

A parameter is scored only when it is (1) estimated from the subject's data, not a fixed setting,
(2) the same quantity, in the same units and parametrisation, as the generator's value, and
(3) identifiable from what the model saw. Each scored parameter below says why; a parameter that
qualifies in general but not for one subject (stroke sigma taken from a population prior;
Alzheimer's kappa on a connectome other than the generator's) gets a NaN row with the reason, so
the cohort counts it as missing instead of scoring a prior or a different quantity.

Not scored, with the reason:
- glioma ``theta_t1gd``, ``theta_flair``: the T1Gd/FLAIR visibility thresholds are fixed settings
  (``glioma.theta_*``, ``fit_thresholds: false``), not estimates; the generator draws its own per
  subject. ``t0_days`` and ``seed_voxel`` have no counterpart in the truth (the generator's day 0
  is when the FLAIR volume passes a target, its seed a 3 mm Gaussian in deep WM).
- Alzheimer's baseline: computed from the data (a robust low quantile), not fitted.
- stroke: the generator's collateral inflow, its time constant and the inflow scale are the
  hidden mechanism and the occlusion; the model has no such parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from neurohybrid.evaluation.metrics import flatten_numbers


def _stroke_sigma(fit: dict, target_meta: dict) -> str:
    # the fit json's top level says whether the acute core identified sigma (stroke.mechanistic)
    if fit.get("sigma_identified") is False:
        return f"sigma not identified by the acute core (taken from the {fit.get('sigma_source', 'prior')})"
    return ""


# the generator's Laplacian (synth.alzheimer.network_setup): tvb-data's DK-68, max-normalised
GENERATOR_CONNECTOME = "normative"


def _alzheimer_kappa(fit: dict, target_meta: dict) -> str:
    source = target_meta.get("connectome_source")
    if source is None:
        return "connectome source not recorded in the target: kappa's scale unknown"
    if source != GENERATOR_CONNECTOME:
        return f"kappa is relative to the subject's {source} connectome, not the generator's normative Laplacian"
    return ""


@dataclasses.dataclass(frozen=True)
class Recoverable:
    name: str    # key of the fit json's "parameters"
    truth: str   # dotted path in the ground-truth json (or its unique last component)
    unit: str
    why: str     # why the fit and the truth are the same quantity
    # (fit json, target meta) -> why it is not scored for this subject, "" when it is
    applies: Callable[[dict, dict], str] | None = None


RECOVERABLE = {
    "glioma": (
        Recoverable("dw", "disease.dw", "mm^2/day",
                    "white-matter diffusivity of the same Fisher-Kolmogorov solver, D = dw (P_wm + P_gm dg_ratio), "
                    "dg_ratio 0.1 in both"),
        Recoverable("rho", "disease.rho", "1/day",
                    "base proliferation rate; the generator's ventricle modulation (the hidden mechanism) is "
                    "absent from the model, so the fit absorbs part of it"),
    ),
    "alzheimer": (
        Recoverable("kappa", "disease.kappa", "1/year",
                    "transport rate on the max-normalised Laplacian; the same only on the generator's connectome",
                    _alzheimer_kappa),
        Recoverable("alpha", "disease.alpha", "1/year",
                    "the model writes SUVR u = b + A tau, so du/dt = A dtau/dt and alpha e (1 - e/A), e = u - b, "
                    "is A times the generator's alpha tau (1 - tau): the same alpha (a test checks the identity)"),
        Recoverable("suvr_amplitude", "disease.suvr_amplitude", "SUVR",
                    "A in SUVR = 1 + A tau (the model's capacity above its baseline)"),
    ),
    "stroke": (
        Recoverable("sensitivity", "disease.sensitivity", "1",
                    "ischaemic sensitivity sigma of the same Xue 2021 model (CBF / sigma)", _stroke_sigma),
    ),
}


def _truth_value(truth_flat: dict, path: str) -> float | None:
    """The truth at ``path``, or at the unique key ending in its last component (the synth may nest)."""
    if path in truth_flat:
        return truth_flat[path]
    leaf = path.rsplit(".", 1)[-1]
    hits = [k for k in truth_flat if k == leaf or k.endswith("." + leaf)]
    return truth_flat[hits[0]] if len(hits) == 1 else None


def recovered(disorder: str, fit: dict, truth: dict, target_meta: dict | None = None) -> dict:
    """{name: (estimate, truth, reason)} for the disorder's recoverable parameters that the fit
    reports and the truth holds; reason "" when scored, else why this subject's value is not."""
    params = flatten_numbers(fit.get("parameters") or {})
    truth_flat = flatten_numbers(truth)
    out = {}
    for spec in RECOVERABLE.get(disorder, ()):
        true = _truth_value(truth_flat, spec.truth)
        if spec.name not in params or true is None:
            continue
        reason = spec.applies(fit, target_meta or {}) if spec.applies else ""
        out[spec.name] = (params[spec.name], true, reason)
    return out


def recovery_scores(disorder: str, fit: dict, truth: dict, target_meta: dict | None = None) -> tuple[dict, dict]:
    """(values, reasons): absolute and relative recovery error per recoverable parameter
    (param_abs_error_<name>, param_rel_error_<name> = |est - true| / |true|); NaN with a reason
    where this subject's value is not scored."""
    values, reasons = {}, {}
    for name, (est, true, reason) in sorted(recovered(disorder, fit, truth, target_meta).items()):
        abs_key, rel_key = f"param_abs_error_{name}", f"param_rel_error_{name}"
        if reason:
            values[abs_key] = values[rel_key] = math.nan
            reasons[abs_key] = reasons[rel_key] = reason
            continue
        values[abs_key] = abs(est - true)
        values[rel_key] = abs(est - true) / abs(true) if true != 0 else math.nan
        if true == 0:
            reasons[rel_key] = "true value 0: relative error undefined"
    return values, reasons
