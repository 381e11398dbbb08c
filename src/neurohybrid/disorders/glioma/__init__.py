"""Glioma: Fisher-Kolmogorov growth on template-space tissue maps, observed as T1Gd/FLAIR masks."""

from __future__ import annotations

from pathlib import Path

from neurohybrid.disorders.base import Disorder, Forecast, SubjectData


class GliomaDisorder(Disorder):
    name = "glioma"

    @property
    def families(self):  # imported lazily: torch is only needed once a family is used
        from neurohybrid.disorders.glioma.families import FAMILIES

        return FAMILIES

    def build_inputs(self, subject: str, bids_dir: Path, preproc_dir: Path, config: dict) -> tuple[SubjectData, SubjectData]:
        from neurohybrid.disorders.glioma.inputs import build_inputs

        return build_inputs(subject, Path(bids_dir), Path(preproc_dir), config or {})

    def write_forecast(self, forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path):
        from neurohybrid.disorders.glioma.inputs import write_forecast

        return write_forecast(forecast, inputs, family, Path(out_dir))


DISORDER = GliomaDisorder()
