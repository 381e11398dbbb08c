"""Ischaemic stroke: Xue 2021 tissue death driven by the acute CBF, with reperfusion at the known time."""

from __future__ import annotations

from neurohybrid.disorders.voxel import VoxelDisorder


class StrokeDisorder(VoxelDisorder):
    name = "stroke"
    package = __name__


DISORDER = StrokeDisorder()
