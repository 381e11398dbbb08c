"""Disorder-specific model inputs, model families and forecasts (glioma, Alzheimer's, stroke)."""

from neurohybrid.registry import DISORDERS  # noqa: F401  (the names live in neurohybrid.registry)
