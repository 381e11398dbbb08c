"""Disorder-specific model inputs, model families and forecasts (glioma, Alzheimer's, stroke)."""

DISORDERS = ("glioma", "alzheimer", "stroke")
