"""Cohort figures from a tiny hand-made cohort (glioma + alzheimer, no stroke) through the CLI."""

import json
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from evaluation_builders import affine_for, cube, write_fit, write_target  # noqa: E402

from neurohybrid.cli import main  # noqa: E402
from neurohybrid.io import save_volume  # noqa: E402
from neurohybrid.report.figures import FIGURE_NAMES, _composite, write_all  # noqa: E402
from neurohybrid.evaluation.statistics import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cohort")
    voxel = [2.0, 2.0, 2.0]
    aff = affine_for(voxel)
    shape = (10, 10, 8)
    rng = np.random.default_rng(0)
    regions = [f"L_r{i}" for i in range(6)]
    for k in range(3):
        g = f"g{k}"
        t1 = cube(shape, (3, 3, 2), (6 + k % 2, 6, 5))
        fl = cube(shape, (2, 2, 1), (8, 8, 6))
        write_target(tmp_path / "targets", g, "glioma", {"t1gd": t1, "flair": fl},
                     {"affine": aff.tolist(), "voxel_mm": voxel, "day": 100.0})
        truth = tmp_path / "groundtruth" / f"sub-{g}"
        truth.mkdir(parents=True)
        (truth / "params.json").write_text(json.dumps({"dw": 0.1 + 0.05 * k, "rho": 0.02}))
        a = f"a{k}"
        obs = 1.0 + rng.random(6)
        write_target(tmp_path / "targets", a, "alzheimer", {"suvr": obs}, {"regions": regions, "years": 2.0})
        for model in ("mechanistic", "sol"):
            fdir = tmp_path / "forecasts" / f"sub-{g}"
            save_volume(fdir / f"sub-{g}_model-{model}_desc-T1Gd_mask.nii.gz", cube(shape, (3, 3, 2), (6, 6, 5)), aff, dtype=np.uint8)
            save_volume(fdir / f"sub-{g}_model-{model}_desc-FLAIR_mask.nii.gz", cube(shape, (2, 2, 1), (7, 8, 6)), aff, dtype=np.uint8)
            extra = {"sol_error_vs_fine": 0.1 / (k + 1), "coarse_error_vs_fine": 0.3, "sol_cost_seconds": 1.0 + k,
                     "coarse_cost_seconds": 0.5 + k, "fine_cost_seconds": 8.0 + k} if model == "sol" else {}
            write_fit(fdir, g, model, parameters={"dw": 0.12 + 0.05 * k, "rho": 0.021}, **extra)
            adir = tmp_path / "forecasts" / f"sub-{a}"
            adir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"region": regions, "suvr": obs + 0.1 * rng.normal(size=6)}).to_csv(
                adir / f"sub-{a}_model-{model}_pet.tsv", sep="\t", index=False)
            write_fit(adir, a, model)
            for subj, dis, fd in ((g, "glioma", fdir), (a, "alzheimer", adir)):
                rc = main(["evaluate", "--disorder", dis, "--subject", subj, "--model", model, "--forecast-dir", str(fd),
                           "--target", str(tmp_path / "targets"), "--truth", str(tmp_path / "groundtruth"),
                           "--out", str(tmp_path / "metrics" / f"sub-{subj}" / f"sub-{subj}_model-{model}_metrics.tsv")])
                assert rc == 0
    assert main(["cohort", "table", "--metrics-dir", str(tmp_path / "metrics"), "--out", str(tmp_path / "cohort" / "metrics.tsv")]) == 0
    return tmp_path


def test_figures_written_and_flag_missing_data(cohort):
    frame = read_metrics(cohort / "cohort" / "metrics.tsv")
    drawn = write_all(frame, cohort / "figs", cohort / "forecasts", cohort / "targets", cohort / "groundtruth")
    assert set(drawn) == set(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        img = mpimg.imread(cohort / "figs" / name)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert drawn["boxplot_glioma.png"] and drawn["boxplot_alzheimer.png"]
    assert drawn["overlay_glioma.png"] and drawn["scatter_alzheimer.png"]
    assert drawn["parameter_recovery.png"] and drawn["sol_accuracy_cost.png"]
    # no stroke subjects in this cohort: those figures say so instead of drawing
    assert not drawn["boxplot_stroke.png"] and not drawn["overlay_stroke.png"]
    # without ground truth there is nothing to recover; without a stats table no primary comparisons
    again = write_all(frame, cohort / "figs2", cohort / "forecasts", cohort / "targets", None)
    assert not again["parameter_recovery.png"] and not again["primary_comparisons.png"]


def test_figures_cli(cohort):
    """Through the CLI with the stats table (cohort stats first): the primary comparisons are drawn."""
    out = cohort / "cohort" / "figures"
    stats = cohort / "cohort" / "stats.tsv"
    assert main(["cohort", "stats", "--metrics", str(cohort / "cohort" / "metrics.tsv"), "--stats-out", str(stats),
                 "--summary-out", str(cohort / "cohort" / "summary.tsv")]) == 0
    rc = main(["cohort", "figures", "--metrics", str(cohort / "cohort" / "metrics.tsv"), "--forecasts", str(cohort / "forecasts"),
               "--targets", str(cohort / "targets"), "--truth", str(cohort / "groundtruth"), "--stats", str(stats),
               "--out-dir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(FIGURE_NAMES)
    from neurohybrid.evaluation.statistics import read_stats
    from neurohybrid.report.figures import primary_comparisons

    assert primary_comparisons(read_stats(stats), cohort / "pc.png")  # glioma sol vs mechanistic on dice_flair


def test_box_labels_count_missing_subjects():
    from neurohybrid.report.figures import box_labels

    assert box_labels(["mechanistic", "ude"], [np.ones(5), np.ones(3)], 5) == ["mechanistic", "UDE (2 n/a)"]  # registry labels


def test_overlay_colours():
    t = np.array([[1, 1], [0, 0]], float)
    f = np.array([[1, 0], [1, 0]], float)
    rgb = _composite(t, f)
    assert rgb[0, 0].tolist() == [1, 1, 0]  # both: yellow
    assert rgb[0, 1].tolist() == [1, 0, 0]  # observed only: red
    assert rgb[1, 0].tolist() == [0, 1, 0]  # forecast only: green
    assert rgb[1, 1].tolist() == [0, 0, 0]


def test_training_curves_read_every_fold_checkpoint(tmp_path):
    import torch

    from neurohybrid.report.figures import read_training_histories, training_curves

    for disorder, fold, model, hist, val in (("glioma", 0, "residual", [1.0, 0.5, 0.25], [1.2, 0.7, 0.6]),
                                              ("glioma", 1, "residual", [2.0, 1.0], []),
                                              ("stroke", 0, "mechanistic", [], [])):
        path = tmp_path / "models" / disorder / f"fold-{fold}" / f"model-{model}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"history": hist, "val_history": val}, path)
    frame = read_training_histories(tmp_path / "models")
    assert len(frame) == 3 + 3 + 2
    assert set(frame["split"]) == {"train", "validation"}
    fold0 = frame[(frame["fold"] == 0) & (frame["split"] == "validation")]
    assert fold0["loss"].tolist() == [1.2, 0.7, 0.6] and fold0["epoch"].tolist() == [0, 1, 2]
    assert training_curves(tmp_path / "models", tmp_path / "curves.png")
    assert mpimg.imread(tmp_path / "curves.png").shape[0] > 50
    assert not training_curves(tmp_path / "nothing", tmp_path / "empty.png")
    assert (tmp_path / "empty.png").exists()
