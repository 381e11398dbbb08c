"""Glioma: Fisher-Kolmogorov growth on template-space tissue maps, observed as T1Gd/FLAIR masks."""

from __future__ import annotations

from neurohybrid.disorders.voxel import VoxelDisorder


class GliomaDisorder(VoxelDisorder):
    name = "glioma"
    package = __name__


DISORDER = GliomaDisorder()
