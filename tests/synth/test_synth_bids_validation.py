"""The demo BIDS as a validator sees it: spatial units in every NIfTI header, dataset Authors, and
(where a validator is installed) no errors and no NIFTI_UNIT / NO_AUTHORS warnings."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import pytest


def test_every_image_has_spatial_units_and_the_dataset_authors(cohort):
    bids, truth, _ = cohort
    images = sorted(bids.rglob("*.nii.gz"))
    assert len(images) > 10
    for path in images:
        assert nib.load(str(path)).header.get_xyzt_units() == ("mm", "sec"), path
    for folder in (bids, bids / "derivatives" / "lesions", truth):
        authors = json.loads((folder / "dataset_description.json").read_text()).get("Authors")
        assert isinstance(authors, list) and authors and all(isinstance(a, str) and a for a in authors), folder


def _validator_issues(report: dict) -> tuple[set[str], set[str]]:
    """(error codes, warning codes) from the node validator's --json (1.x) or the deno one's (2.x)."""
    issues = report.get("issues", {})
    if "errors" in issues:  # bids-validator 1.x (npm)
        return ({i["key"] for i in issues["errors"]}, {i["key"] for i in issues["warnings"]})
    listed = issues.get("issues", [])
    return ({i["code"] for i in listed if i.get("severity") == "error"},
            {i["code"] for i in listed if i.get("severity") == "warning"})


@pytest.mark.skipif(shutil.which("bids-validator") is None,
                    reason="no bids-validator on PATH (npm install -g bids-validator, or the bids-validator-deno wheel)")
def test_bids_validator_reports_no_errors_and_no_unit_or_author_warnings(cohort):
    bids, _, _ = cohort
    run = subprocess.run(["bids-validator", "--json", str(bids)], capture_output=True, text=True, timeout=300)
    report = json.loads(run.stdout)
    errors, warnings = _validator_issues(report)
    assert not errors, (errors, run.stdout[-3000:])
    assert not warnings & {"NIFTI_UNIT", "NO_AUTHORS"}, warnings
