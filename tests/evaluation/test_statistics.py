"""Cohort tables: the summary (every metric, bootstrap interval, missing values counted), the
pre-registered primary comparisons (Holm over them only, baselines against each other), the
sample-size note, and the `cohort stats` command."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from neurohybrid.cli import main
from neurohybrid.errors import InputError
from neurohybrid.evaluation import analysis
from neurohybrid.evaluation.inference import holm
from neurohybrid.evaluation.statistics import (NO_ROW, collect_metrics, comparisons, paired_tests, power_table,
                                               read_stats, summarise)

PLAN = analysis.plan({"seed": 3, "analysis": {"resamples": 999}})


def synthetic_table(n=10, seed=0):
    """Alzheimer's cohort: 'residual' beats 'mechanistic' by about 1 on rmse_suvr (the primary metric) for
    every subject; a secondary metric (pearson_r) with an even clearer, but untested, difference."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = 3.0 + rng.normal()
        s = f"{i:02d}"
        rows += [(s, "alzheimer", "mechanistic", "rmse_suvr", base),
                 (s, "alzheimer", "residual", "rmse_suvr", base - 1.0 - 0.01 * i),
                 (s, "alzheimer", "persistence", "rmse_suvr", base + 0.5 + rng.normal()),
                 (s, "alzheimer", "mechanistic", "pearson_r", 0.5 + 0.001 * i),
                 (s, "alzheimer", "residual", "pearson_r", 0.9 + 0.001 * i),
                 (s, "alzheimer", "persistence", "pearson_r", 0.4 + 0.002 * i),
                 (s, "alzheimer", "residual", "fit_seconds", 2.0),
                 (s, "alzheimer", "mechanistic", "fit_seconds", 2.0)]
    frame = pd.DataFrame(rows, columns=["subject", "disorder", "model", "metric", "value"])
    frame["missing_reason"] = ""
    return frame


def two_disorders(n=8, seed=1):
    """Glioma (primary dice_flair) and stroke (primary dice_infarct), three families each."""
    rng = np.random.default_rng(seed)
    rows = []
    for disorder, metric, prefix in (("glioma", "dice_flair", "g"), ("stroke", "dice_infarct", "s")):
        for i in range(n):
            base = rng.uniform(0.4, 0.7)
            for k, model in enumerate(("persistence", "mechanistic", "ude")):
                rows.append((f"{prefix}{i}", disorder, model, metric, base + 0.1 * k + 0.01 * rng.normal(), ""))
                rows.append((f"{prefix}{i}", disorder, model, "dice_t1gd" if disorder == "glioma" else "hd95_mm_infarct",
                             base + 0.2 * k, ""))
    return pd.DataFrame(rows, columns=["subject", "disorder", "model", "metric", "value", "missing_reason"])


def test_paired_tests_compare_every_family_with_every_baseline_on_the_primary_metric_only():
    stats_ = paired_tests(synthetic_table(), PLAN)
    assert set(stats_["metric"]) == {"rmse_suvr"}  # pearson_r and fit_seconds are secondary: no test
    res = stats_[stats_.model == "residual"].set_index("baseline")
    assert set(res.index) == {"mechanistic", "persistence"}  # data_driven absent from the cohort
    mech = res.loc["mechanistic"]
    assert mech["n"] == 10 and mech["n_missing"] == 0 and mech["p_value"] == pytest.approx(2 / 2 ** 10)
    assert mech["median_difference"] == pytest.approx(-1.045) and mech["ci_low"] <= -1.045 <= mech["ci_high"]
    assert mech["ci_high"] < 0 and mech["favours"] == "residual"  # lower RMSE is better
    assert mech["comparison"] == "family vs baseline" and bool(mech["significant"])


def test_baselines_are_compared_with_each_other():
    stats_ = paired_tests(synthetic_table(), PLAN)
    base = stats_[stats_.comparison == "baseline vs baseline"]
    assert list(zip(base.model, base.baseline)) == [("mechanistic", "persistence")]
    # with all three baselines: the three pairs, in the registry's order
    assert [(m, b) for m, b, k in comparisons(["ude", "data_driven", "mechanistic", "persistence"])
            if k == "baseline vs baseline"] == [("mechanistic", "persistence"), ("data_driven", "persistence"),
                                                ("data_driven", "mechanistic")]
    assert len(comparisons(["ude", "data_driven", "mechanistic", "persistence"])) == 3 + 3


def test_holm_runs_over_the_primary_comparisons_only():
    frame = two_disorders()
    stats_ = paired_tests(frame, PLAN)
    # 1 family x 2 baselines + 1 baseline pair per disorder, on its primary metric only
    assert sorted(set(zip(stats_.disorder, stats_.metric))) == [("glioma", "dice_flair"), ("stroke", "dice_infarct")]
    for disorder, grp in stats_.groupby("disorder"):
        assert len(grp) == 3 and (grp["holm_m"] == 3).all() and (grp["holm_family"] == disorder).all()
        assert np.allclose(grp["p_holm"], holm(grp["p_value"].to_numpy()))
    # one family over both disorders: 6 comparisons
    everything = paired_tests(frame, analysis.plan({"seed": 3, "analysis": {"holm_scope": "all", "resamples": 999}}))
    assert (everything["holm_m"] == 6).all()
    assert np.allclose(everything["p_holm"], holm(everything["p_value"].to_numpy()))
    # another primary metric is a different family: the tests move with the plan, not with the data
    other = paired_tests(frame, analysis.plan({"analysis": {"primary_metrics": {"glioma": "dice_t1gd"}, "resamples": 999}}))
    assert set(other.loc[other.disorder == "glioma", "metric"]) == {"dice_t1gd"}


def test_untestable_comparison_keeps_its_place_in_the_holm_family():
    frame = synthetic_table()
    same = frame[frame.model == "mechanistic"].assign(model="data_driven")  # identical to mechanistic
    stats_ = paired_tests(pd.concat([frame, same], ignore_index=True), PLAN)
    row = stats_[(stats_.model == "data_driven") & (stats_.baseline == "mechanistic")].iloc[0]
    assert math.isnan(row["p_value"]) and "all differences zero" in row["note"] and not row["significant"]
    # residual x 3 baselines + 3 baseline pairs, the untestable one included
    assert len(stats_) == 6 and (stats_["holm_m"] == 6).all()
    finite = stats_["p_value"].notna().to_numpy()
    p = stats_["p_value"].to_numpy()[finite]
    assert np.allclose(stats_["p_holm"].to_numpy()[finite], holm(p, family_size=6))
    assert not np.allclose(holm(p, family_size=6), holm(p))  # counting it makes a difference


def test_a_configured_family_without_any_row_still_counts():
    """A family whose every forecast failed is a planned comparison with n = 0, not a smaller family."""
    plan = analysis.plan({"analysis": {"resamples": 999}, "models": {"families": ["persistence", "mechanistic", "residual", "ude"]}})
    stats_ = paired_tests(synthetic_table(), plan)
    ude = stats_[stats_.model == "ude"]
    assert len(ude) == 2 and (ude["n"] == 0).all() and (ude["n_missing"] == 10).all()
    assert (ude["missing_reasons"] == f"10 × ude: {NO_ROW}").all() and ude["p_value"].isna().all()
    assert (stats_["holm_m"] == 2 + 2 + 1).all()


def test_small_cohort_says_it_cannot_reach_significance():
    stats_ = paired_tests(synthetic_table(n=4), PLAN)
    row = stats_[(stats_.model == "residual") & (stats_.baseline == "mechanistic")].iloc[0]
    assert row["p_min"] == 0.125 and "cannot reach alpha 0.05 after Holm" in row["note"]


def test_a_nan_metric_is_counted_as_missing_with_its_reason():
    frame = synthetic_table()
    rows = frame.index[(frame.subject == "03") & (frame.model == "residual") & (frame.metric == "rmse_suvr")]
    frame.loc[rows, ["value", "missing_reason"]] = [np.nan, "empty forecast mask"]
    frame = frame[~((frame.subject == "07") & (frame.model == "residual"))]  # a subject without any residual row
    summary = summarise(frame, PLAN).set_index(["model", "metric"])
    row = summary.loc[("residual", "rmse_suvr")]
    assert row["n"] == 8 and row["n_missing"] == 2 and row["role"] == "primary"
    assert row["missing_reasons"] == f"1 × empty forecast mask; 1 × {NO_ROW}"
    assert summary.loc[("mechanistic", "rmse_suvr"), "n_missing"] == 0
    assert summary.loc[("residual", "pearson_r"), "role"] == "secondary"
    stats_ = paired_tests(frame, PLAN).set_index(["model", "baseline"])
    pair = stats_.loc[("residual", "mechanistic")]
    assert pair["n"] == 8 and pair["n_missing"] == 2 and "residual: empty forecast mask" in pair["missing_reasons"]


def test_summary_intervals_and_degenerate_rows():
    s = summarise(synthetic_table(), PLAN)
    assert list(s.columns) == ["disorder", "model", "metric", "role", "n", "n_missing", "missing_reasons", "mean",
                               "ci_low", "ci_high", "median", "ci_method", "ci_level", "note", "patients"]
    assert (s["patients"] == "all").all()  # nobody treated: no split rows
    const = s[(s.model == "residual") & (s.metric == "fit_seconds")].iloc[0]
    assert const["n"] == 10 and const["mean"] == 2.0 and math.isnan(const["ci_low"]) and "all values equal" in const["note"]
    rmse = s[(s.model == "mechanistic") & (s.metric == "rmse_suvr")].iloc[0]
    assert rmse["ci_low"] < rmse["mean"] < rmse["ci_high"] and rmse["ci_method"] == "bca" and rmse["ci_level"] == 0.95
    # the same seed gives the same table
    assert summarise(synthetic_table(), PLAN).equals(s)


def test_summary_separates_treated_and_untreated_patients():
    frame = synthetic_table()
    subjects = sorted(frame["subject"].unique())
    frame["treated"] = frame["subject"].isin(subjects[:4]).astype(int)
    s = summarise(frame, PLAN)
    key = (s.model == "mechanistic") & (s.metric == "rmse_suvr")
    rows = s[key].set_index("patients")
    assert list(rows.index) == ["all", "treated", "untreated"]
    assert rows.at["treated", "n"] == 4 and rows.at["untreated", "n"] == len(subjects) - 4
    grp = frame[(frame.model == "mechanistic") & (frame.metric == "rmse_suvr")]
    assert rows.at["treated", "mean"] == pytest.approx(grp[grp.treated == 1]["value"].mean())
    # the "all" rows are those of a table without the column
    plain = summarise(synthetic_table(), PLAN)
    assert s[s.patients == "all"].reset_index(drop=True).equals(plain)


def test_power_table_from_the_primary_comparisons():
    power = power_table(synthetic_table(), PLAN)
    assert len(power) == len(paired_tests(synthetic_table(), PLAN))
    row = power[(power.model == "residual") & (power.baseline == "mechanistic")].iloc[0]
    assert row["alpha_per_test"] == pytest.approx(0.05 / 3) and row["walsh_p"] == 0.0  # every difference negative
    assert row["n_required"] >= 7 and "floor" in row["note"]


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
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"seed": 1, "analysis": {"resamples": 999}}))
    out = tmp_path / "cohort"
    assert main(["cohort", "stats", "--metrics", str(table), "--config", str(config), "--summary-out", str(out / "summary.tsv"),
                 "--stats-out", str(out / "stats.tsv"), "--power-out", str(out / "power.tsv")]) == 0
    stats_ = read_stats(out / "stats.tsv")
    assert {"p_value", "p_holm", "median_difference", "note"} <= set(stats_.columns)
    # the baselines against each other are in the file
    assert ("mechanistic", "persistence", "baseline vs baseline") in set(zip(stats_.model, stats_.baseline, stats_.comparison))
    assert pd.read_csv(out / "power.tsv", sep="\t")["n_required"].notna().all()
    summary = pd.read_csv(out / "summary.tsv", sep="\t")
    assert {"n", "n_missing", "missing_reasons", "ci_low", "ci_high"} <= set(summary.columns)


def test_cohort_stats_rejects_a_bad_analysis_plan(tmp_path, capsys):
    table = tmp_path / "metrics.tsv"
    synthetic_table(3).to_csv(table, sep="\t", index=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"analysis": {"primary_metrics": {"glioma": "dice_flar"}}}))
    rc = main(["cohort", "stats", "--metrics", str(table), "--config", str(config), "--summary-out", str(tmp_path / "s.tsv"),
               "--stats-out", str(tmp_path / "t.tsv")])
    assert rc == 2
    assert "analysis.primary_metrics.glioma" in capsys.readouterr().err
    assert not (tmp_path / "s.tsv").exists()
