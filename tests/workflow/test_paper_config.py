"""config/paper.yaml is merged over config/config.yaml (snakemake --configfile): no demo compute
budget of config.yaml may survive into the paper run."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_paper_budgets_override_the_demo_budgets():
    from snakemake.utils import update_config

    from neurohybrid.disorders.alzheimer.model import Settings
    from neurohybrid.disorders.glioma import mechanistic as glioma
    from neurohybrid.disorders.stroke import mechanistic as stroke

    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    merged = copy.deepcopy(demo)
    update_config(merged, paper)
    got = {"stroke": stroke.settings(merged)["epochs"], "glioma": glioma.settings(merged)["epochs"],
           "alzheimer": Settings.from_config(merged).epochs}
    for name, epochs in got.items():  # a disorder's own paper budget, else the paper's models: budget
        assert epochs == int((paper.get(name) or {}).get("epochs", paper["models"]["epochs"])), name
    assert got["stroke"] != demo["stroke"]["epochs"]  # the demo's stroke budget does not survive the merge
