"""Ischaemic stroke: Xue 2021 tissue death driven by the acute CBF, with reperfusion at the known time."""

from __future__ import annotations

from pathlib import Path

from neurohybrid.disorders.base import Disorder, Forecast, SubjectData


class StrokeDisorder(Disorder):
    name = "stroke"

    @property
    def families(self):  # imported lazily: torch is only needed once a family is used
        from neurohybrid.disorders.stroke.families import FAMILIES

        return FAMILIES

    def build_inputs(self, subject: str, bids_dir: Path, preproc_dir: Path, config: dict) -> tuple[SubjectData, SubjectData]:
        from neurohybrid.disorders.stroke.inputs import build_inputs

        return build_inputs(subject, Path(bids_dir), Path(preproc_dir), config or {})

    def write_forecast(self, forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path):
        from neurohybrid.disorders.stroke.inputs import write_forecast

        return write_forecast(forecast, inputs, family, Path(out_dir))


DISORDER = StrokeDisorder()
