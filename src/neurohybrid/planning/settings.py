"""Planning settings (config ``planning:``), with their defaults and units."""

from __future__ import annotations

import copy

from neurohybrid.errors import InputError

# Braak stages III/IV (Braak & Braak 1991; the DK mapping of Schöll et al. 2016 / Cho et al. 2016):
# III = parahippocampal, fusiform, lingual, amygdala; IV = inferior and middle temporal, temporal
# pole, banks of the STS, insula, posterior/isthmus cingulate. Both hemispheres.
_BRAAK34 = ["parahippocampal", "fusiform", "lingual", "amygdala", "inferiortemporal", "middletemporal", "temporalpole",
            "bankssts", "insula", "posteriorcingulate", "isthmuscingulate", "caudalanteriorcingulate",
            "rostralanteriorcingulate"]

DEFAULTS = {
    "glioma": {
        "margin_mm": 15.0,  # standard CTV margin around the visible tumour (mm)
    },
    "stroke": {
        "cbf_threshold": 20.0,  # hypoperfused tissue: CBF below this (ml/100 ml/min)
        "max_reperfusion_h": 24.0,  # latest reperfusion time of the curve (hours from onset)
        "step_h": 2.0,  # spacing of the reperfusion times (hours)
        "horizon_h": None,  # final infarct at this time from onset (hours); None: the follow-up time
    },
    "alzheimer": {
        "horizons_years": [2.0, 5.0],  # forecast regional tau this many years after the last visit
        "meta_region": [f"{h}_{r}" for r in _BRAAK34 for h in ("L", "R")],
        "positivity_suvr": 1.3,  # meta-region mean SUVR that counts as tau positive
        "production_reduction": 0.3,  # trial: production (alpha) lowered by this fraction from now on
        "max_years": 30.0,  # longest simulated future (years): later crossings are reported as censored
    },
}


def resolve(config: dict | None) -> dict:
    """DEFAULTS overridden by config ``planning:``; an unknown key is an InputError naming it."""
    out = copy.deepcopy(DEFAULTS)
    section = (config or {}).get("planning") or {}
    for disorder, values in section.items():
        if disorder not in out:
            raise InputError(f"config key 'planning.{disorder}': unknown (known: {', '.join(out)})")
        for key, value in (values or {}).items():
            if key not in out[disorder]:
                raise InputError(f"config key 'planning.{disorder}.{key}': unknown (known: {', '.join(out[disorder])})")
            out[disorder][key] = value
    return out
