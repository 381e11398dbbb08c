import math

import numpy as np
import pandas as pd
import pytest

from neurohybrid.cli import main
from neurohybrid.errors import InputError
from neurohybrid.evaluation.statistics import (collect_metrics, holm, paired_tests, paired_wilcoxon, summarise,
                                               t_interval)


def synthetic_table(n=10, seed=0):
    """A cohort where 'residual' beats 'mechanistic' by exactly 1 on rmse, for every subject."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = 3.0 + rng.normal()
        rows += [(f"{i:02d}", "alzheimer", "mechanistic", "rmse_suvr", base),
                 (f"{i:02d}", "alzheimer", "residual", "rmse_suvr", base - 1.0 - 0.01 * i),
                 (f"{i:02d}", "alzheimer", "persistence", "rmse_suvr", base + rng.normal()),
                 (f"{i:02d}", "alzheimer", "residual", "fit_seconds", 2.0),
                 (f"{i:02d}", "alzheimer", "mechanistic", "fit_seconds", 2.0)]
    return pd.DataFrame(rows, columns=["subject", "disorder", "model", "metric", "value"])


def test_wilcoxon_known_effect_exact_p():
    d = -(1.0 + 0.01 * np.arange(8))  # all 8 differences negative, distinct magnitudes
    res = paired_wilcoxon(d, np.zeros(8))
    assert res["n"] == 8 and res["statistic"] == 0.0
    assert res["p_value"] == pytest.approx(2 / 2 ** 8)  # exact two-sided: only the all-negative sign pattern
    assert res["median_difference"] == pytest.approx(np.median(d))
    assert res["note"] == ""


def test_wilcoxon_degenerate_cases():
    zero = paired_wilcoxon([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert math.isnan(zero["p_value"]) and zero["note"] == "all differences zero"
    none = paired_wilcoxon([np.nan], [1.0])
    assert none["n"] == 0 and math.isnan(none["statistic"]) and none["note"] == "no paired subjects"
    few = paired_wilcoxon([1.0, 2.0, 3.5], [0.0, 0.0, 0.0])
    assert few["p_value"] == pytest.approx(0.25) and "cannot fall below" in few["note"]


def test_paired_tests_table():
    stats_ = paired_tests(synthetic_table())
    rmse_res = stats_[(stats_.metric == "rmse_suvr") & (stats_.model == "residual")].set_index("baseline")
    assert set(rmse_res.index) == {"mechanistic", "persistence"}  # data_driven absent from the cohort
    mech = rmse_res.loc["mechanistic"]
    assert mech["n"] == 10 and mech["p_value"] < 0.01 and mech["median_difference"] == pytest.approx(-1.045)
    # baselines are never tested against each other
    assert set(stats_["model"]) == {"residual"}
    fit = stats_[(stats_.metric == "fit_seconds") & (stats_.baseline == "mechanistic")].iloc[0]
    assert math.isnan(fit["p_value"]) and fit["note"] == "all differences zero"
    assert (stats_["p_holm"].dropna() >= stats_["p_value"].dropna().loc[stats_["p_holm"].dropna().index]).all()


def test_holm_by_hand():
    p = holm([0.01, 0.04, np.nan, 0.03])
    assert p[0] == pytest.approx(0.03) and p[3] == pytest.approx(0.06) and p[1] == pytest.approx(0.06)
    assert math.isnan(p[2])


def test_t_interval_covers_at_nominal_rate():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 400
    for _ in range(trials):
        lo, hi = t_interval(rng.normal(5.0, 2.0, size=8))
        hits += lo <= 5.0 <= hi
    assert 0.91 <= hits / trials <= 0.99
    lo, hi = t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, sem 1/sqrt(3), t(0.975, 2) = 4.302653
    assert (lo, hi) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), rel=1e-6)
    assert all(math.isnan(v) for v in t_interval([1.0]))


def test_summary_columns():
    s = summarise(synthetic_table())
    assert list(s.columns) == ["disorder", "model", "metric", "n", "mean", "ci95_low", "ci95_high"]
    row = s[(s.model == "residual") & (s.metric == "fit_seconds")].iloc[0]
    assert row["n"] == 10 and row["mean"] == 2.0 and row["ci95_low"] == row["ci95_high"] == 2.0


def test_collect_adds_persistence_ratio_and_rejects_duplicates(tmp_path):
    t = synthetic_table(3)
    paths = []
    for (sub, model), grp in t.groupby(["subject", "model"]):
        p = tmp_path / f"sub-{sub}_model-{model}_metrics.tsv"
        grp.to_csv(p, sep="\t", index=False)
        paths.append(p)
    frame = collect_metrics(paths)
    ratio = frame[(frame.metric == "rmse_rel_persistence")].set_index(["subject", "model"])["value"]
    raw = t[t.metric == "rmse_suvr"].set_index(["subject", "model"])["value"]
    assert ratio.loc[("01", "residual")] == pytest.approx(raw.loc[("01", "residual")] / raw.loc[("01", "persistence")])
    assert ratio.loc[("00", "persistence")] == pytest.approx(1.0)
    with pytest.raises(InputError, match="more than one"):
        collect_metrics(paths + paths[:1])


def test_malformed_metrics_file_named(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("subject\tdisorder\tmodel\tmetric\tvalue\n01\tstroke\tude\tdice\tabc\n")
    with pytest.raises(InputError, match="non-numeric") as err:
        collect_metrics([p])
    assert err.value.file == str(p)
    q = tmp_path / "bad2.tsv"
    q.write_text("subject\tmodel\tvalue\n01\tude\t1\n")
    with pytest.raises(InputError, match="missing column"):
        collect_metrics([q])


def test_cohort_cli_table_and_stats(tmp_path):
    t = synthetic_table(6)
    mdir = tmp_path / "metrics"
    for (sub, model), grp in t.groupby(["subject", "model"]):
        (mdir / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
        grp.to_csv(mdir / f"sub-{sub}" / f"sub-{sub}_model-{model}_metrics.tsv", sep="\t", index=False)
    table = tmp_path / "cohort" / "metrics.tsv"
    assert main(["cohort", "table", "--metrics-dir", str(mdir), "--out", str(table)]) == 0
    frame = pd.read_csv(table, sep="\t", dtype={"subject": str})
    assert len(frame) == len(t) + 18  # 6 subjects x 3 models gain a persistence ratio
    assert main(["cohort", "stats", "--metrics", str(table), "--summary-out", str(tmp_path / "cohort" / "summary.tsv"),
                 "--stats-out", str(tmp_path / "cohort" / "stats.tsv")]) == 0
    stats_ = pd.read_csv(tmp_path / "cohort" / "stats.tsv", sep="\t")
    assert {"p_value", "median_difference", "note"} <= set(stats_.columns)
