"""The Alzheimer's model settings' defaults and fast (sloppy) values, for ``neurohybrid.settings``."""

from __future__ import annotations

import dataclasses

from neurohybrid.disorders.alzheimer.model import Settings

DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "seed"}
SLOPPY = dict(epochs=15, fit_iterations=15, restarts=2, lbfgs_iterations=3, sol_samples=2)
