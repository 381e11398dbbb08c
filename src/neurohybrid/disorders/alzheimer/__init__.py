"""Alzheimer's disease: tau spread on the structural connectome (network Fisher-KPP) and its hybrids.

``DISORDER`` implements the ``neurohybrid.disorders.base.Disorder`` contract: model inputs from
regional tau-PET SUVR (``inputs.build_inputs``), the families of ``families.py`` and the forecast
file ``sub-S_model-F_pet.tsv`` (region, suvr).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.disorders.base import Disorder, Forecast, SubjectData
from neurohybrid.errors import InputError
from neurohybrid.io.atomic import write_tsv


class AlzheimerDisorder(Disorder):
    name = "alzheimer"

    @property
    def families(self):
        # imported on first use: torch is only needed once a family is (the workflow imports
        # this package's settings when it parses the Snakefile)
        from neurohybrid.disorders.alzheimer.families import FAMILY_CLASSES

        return FAMILY_CLASSES

    def build_inputs(self, subject, bids_dir, preproc_dir, config):
        from neurohybrid.disorders.alzheimer.inputs import build_inputs

        return build_inputs(subject, Path(bids_dir), Path(preproc_dir), config or {})

    def write_forecast(self, forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path) -> list[Path]:
        suvr = np.asarray(forecast.outputs.get("suvr"), dtype=float).ravel()
        regions = list(inputs.meta["regions"])
        if suvr.size != len(regions):
            raise InputError(f"forecast has {suvr.size} SUVR values for {len(regions)} regions", subject=inputs.subject)
        if not np.all(np.isfinite(suvr)):
            raise InputError(f"model {family} produced a non-finite SUVR forecast", subject=inputs.subject)
        path = Path(out_dir) / f"sub-{inputs.subject}_model-{family}_pet.tsv"
        write_tsv(path, pd.DataFrame({"region": regions, "suvr": suvr}))
        return [path]


DISORDER = AlzheimerDisorder()

__all__ = ["DISORDER", "AlzheimerDisorder"]
