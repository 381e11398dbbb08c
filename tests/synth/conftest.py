import pytest

from neurohybrid.synth.cohort import generate_cohort

COHORT = dict(glioma=1, alzheimer=1, stroke=1, dwi_subjects=1, sloppy=True, seed=3)


@pytest.fixture(scope="session")
def cohort_args():
    return dict(COHORT)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """One sloppy cohort (one subject per disorder, DWI for the AD subject), generated once."""
    root = tmp_path_factory.mktemp("cohortA")
    bids, truth = root / "bids", root / "truth"
    summary = generate_cohort(bids, truth, **COHORT)
    return bids, truth, summary
