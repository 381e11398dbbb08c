"""Issue 16, Alzheimer's: a T1w at every visit, with atrophy that follows regional tau."""

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats

from neurohybrid.synth import alzheimer
from neurohybrid.synth.anatomy import make_subject_anatomy


def test_grey_matter_shrinks_where_tau_is_high_and_the_t1w_of_every_visit_shows_it(tmp_path):
    rng = np.random.default_rng(4)
    anat = make_subject_anatomy("atrophy", 4.0, rng)
    params, first = alzheimer.write_subject("atrophy", anat, rng, tmp_path / "bids", tmp_path / "truth")
    table = pd.read_csv(tmp_path / "truth/sub-atrophy/sub-atrophy_desc-tau_regional.tsv", sep="\t")
    wide = table.pivot(index="region", columns="session", values="gm_ml")
    tau = table.pivot(index="region", columns="session", values="tau")
    sessions = sorted(wide.columns)
    # volumes never grow, and shrink more where tau is higher
    assert (wide[sessions].diff(axis=1).iloc[:, 1:] <= 1e-9).all().all()
    shrink = (wide[sessions[0]] - wide[sessions[-1]]) / wide[sessions[0]]
    assert shrink.max() > 0.01
    assert stats.spearmanr(tau[sessions[-1]], shrink).statistic > 0.5
    high, low = tau[sessions[-1]] > tau[sessions[-1]].quantile(0.75), tau[sessions[-1]] < tau[sessions[-1]].quantile(0.25)
    assert shrink[high].mean() > 3 * max(shrink[low].mean(), 1e-6)
    # a T1w per visit; the cortex of the most atrophied region darkens from the first to the last
    paths = [tmp_path / f"bids/sub-atrophy/ses-{s[-2:]}/anat/sub-atrophy_ses-{s[-2:]}_T1w.nii.gz" for s in sessions]
    assert all(p.exists() for p in paths)
    worst = shrink.idxmax()
    region = alzheimer.cortical_label_field(anat) == anat.regions.set_index("name").loc[worst, "id"]
    region &= anat.gm > 0.5
    first_t1, last_t1 = (np.asarray(nib.load(p).dataobj, float)[region].mean() for p in (paths[0], paths[-1]))
    assert last_t1 < first_t1
    # the truth anatomy is the first visit's, with its own atrophy
    assert first.gm.sum() <= anat.gm.sum()
    np.testing.assert_allclose(first.gm + first.csf, anat.gm + anat.csf, atol=1e-9)
