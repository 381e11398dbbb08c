"""The disorders and model families, named once.

Everything that lists them reads this module: the model code (``neurohybrid.disorders``), the
workflow (``workflow/rules/common.smk``: which families a fold trains), the cohort statistics
(which families are baselines), the figures (display order) and the tests; a test checks that the
config schema's enum and the config files agree with it.

Adding a family: one module with its class per disorder (registered in that disorder's
``FAMILIES`` dict) plus one ``FamilySpec`` line here; docs/architecture.md gives the recipe.
"""

from __future__ import annotations

import dataclasses

DISORDERS = ("glioma", "alzheimer", "stroke")


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str
    strategy: str  # baseline | mechanistic | data-driven | parallel | series | parallel-series
    trained: bool  # has a cross-subject component, trained per fold on the fold's training subjects
    baseline: bool  # a reference the hybrids are compared with (and compared with each other)
    label: str  # for figures and tables


# in display order
FAMILIES = (
    FamilySpec("persistence", "baseline", False, True, "no change"),
    FamilySpec("mechanistic", "mechanistic", False, True, "mechanistic"),
    FamilySpec("data_driven", "data-driven", True, True, "data-driven"),
    FamilySpec("residual", "parallel", True, False, "residual (APHYNITY)"),
    FamilySpec("ude", "parallel", True, False, "UDE"),
    FamilySpec("sol", "series", True, False, "accelerated mechanistic (SOL-n)"),
    FamilySpec("sol_precomputed", "series", True, False, "accelerated mechanistic (SOL, pre-computed)"),
    FamilySpec("amortised", "series", True, False, "amortised"),
    FamilySpec("amortised_residual", "parallel-series", True, False, "amortised + residual"),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)
LABELS = {f.name: f.label for f in FAMILIES}
BASELINES = tuple(f.name for f in FAMILIES if f.baseline)
HYBRIDS = tuple(f.name for f in FAMILIES if not f.baseline)

# Families whose per-disorder model needs a fold checkpoint although the family in general does
# not: the stroke mechanistic model falls back to a population prior of tissue sensitivity,
# learned from the fold's training subjects, when a subject's acute core cannot identify it.
TRAINED_FOR_DISORDER = {"stroke": ("mechanistic",)}


def family(name: str) -> FamilySpec:
    for spec in FAMILIES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown model family {name!r} (known: {', '.join(FAMILY_NAMES)})")


def is_trained(name: str, disorder: str | None = None) -> bool:
    """Whether ``name`` (for ``disorder``, when given) is trained per fold."""
    return family(name).trained or name in TRAINED_FOR_DISORDER.get(disorder, ())


def trained_families(names, disorder: str) -> list[str]:
    """The families of ``names`` that a fold of ``disorder`` trains, in the given order."""
    return [n for n in names if is_trained(n, disorder)]
