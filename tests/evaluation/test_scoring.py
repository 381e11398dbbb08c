import json
import math

import numpy as np
import pandas as pd
import pytest

from evaluation_builders import affine_for, cube, write_fit, write_target
from neurohybrid.cli import main
from neurohybrid.errors import InputError
from neurohybrid.evaluation.analysis import SCORED_METRICS
from neurohybrid.evaluation.scoring import REASON, TABLE_COLUMNS, evaluate_subject
from neurohybrid.io import save_volume


def as_dict(frame):
    return dict(zip(frame["metric"], frame["value"]))


def test_glioma_scores_and_parameter_recovery(glioma_case):
    root, _, voxel = glioma_case
    frame = evaluate_subject("glioma", "sub-g1", "mechanistic", root / "forecasts" / "sub-g1",
                             root / "targets", root / "groundtruth")
    assert list(frame.columns) == TABLE_COLUMNS
    assert set(frame["subject"]) == {"g1"} and set(frame["model"]) == {"mechanistic"}
    assert (frame[REASON] == "").all()  # every value present
    m = as_dict(frame)
    assert m["dice_t1gd"] == pytest.approx(0.5)
    assert m["dice_flair"] == 1.0 and m["hd95_mm_flair"] == 0.0
    assert m["abs_volume_error_ml_t1gd"] == 0.0  # same size, shifted
    assert m["hd95_mm_t1gd"] > 0
    assert m["fit_seconds"] == 1.5 and m["inference_seconds"] == 0.25
    assert m["param_abs_error_dw"] == pytest.approx(0.1)
    assert m["param_rel_error_rho"] == pytest.approx(0.0)
    assert "param_abs_error_seed_x" not in m  # no true value for it
    # the visibility thresholds are fixed settings, not estimates: never scored, though the truth has them
    assert not any("theta" in k for k in m)
    scored = {k for k in m if not k.startswith("param_") and k not in ("fit_seconds", "inference_seconds")}
    assert scored == set(SCORED_METRICS["glioma"])


def test_empty_forecast_mask_hd95_is_missing_with_its_reason(glioma_case):
    root, aff, _ = glioma_case
    fdir = root / "forecasts" / "sub-g1"
    save_volume(fdir / "sub-g1_model-mechanistic_desc-T1Gd_mask.nii.gz", np.zeros((10, 10, 10), np.uint8), aff)
    frame = evaluate_subject("glioma", "g1", "mechanistic", fdir, root / "targets").set_index("metric")
    assert math.isnan(frame.at["hd95_mm_t1gd", "value"])
    assert frame.at["hd95_mm_t1gd", REASON] == "empty forecast mask"
    assert frame.at["dice_t1gd", "value"] == 0.0 and frame.at["dice_t1gd", REASON] == ""


def test_glioma_volume_error_in_ml(glioma_case, tmp_path):
    root, aff, voxel = glioma_case
    fdir = root / "forecasts" / "sub-g1"
    bigger = cube((10, 10, 10), (1, 1, 1), (7, 7, 7))  # 216 voxels vs 64
    save_volume(fdir / "sub-g1_model-mechanistic_desc-T1Gd_mask.nii.gz", bigger, aff, dtype=np.uint8)
    m = as_dict(evaluate_subject("glioma", "g1", "mechanistic", fdir, root / "targets"))
    assert m["volume_error_ml_t1gd"] == pytest.approx((216 - 64) * 2.0 / 1000)
    assert not any(k.startswith("param_") for k in m)  # no --truth, no recovery rows


def test_forecast_on_another_grid_is_rejected(glioma_case):
    root, aff, _ = glioma_case
    fdir = root / "forecasts" / "sub-g1"
    bad = fdir / "sub-g1_model-mechanistic_desc-T1Gd_mask.nii.gz"
    save_volume(bad, np.zeros((10, 10, 9), np.uint8), aff)
    with pytest.raises(InputError, match="differs from the target") as err:
        evaluate_subject("glioma", "g1", "mechanistic", fdir, root / "targets")
    assert err.value.file == str(bad) and err.value.subject == "g1"


def test_malformed_target_names_file(glioma_case):
    root, _, _ = glioma_case
    npz = root / "targets" / "sub-g1" / "sub-g1_desc-target.npz"
    np.savez(npz, t1gd=np.zeros((10, 10, 10), bool))  # flair missing
    with pytest.raises(InputError, match="lacks array.*flair") as err:
        evaluate_subject("glioma", "g1", "mechanistic", root / "forecasts" / "sub-g1", root / "targets")
    assert err.value.file == str(npz)
    np.savez(npz, t1gd=np.full((10, 10, 10), 0.5), flair=np.zeros((10, 10, 10)))
    with pytest.raises(InputError, match="boolean"):
        evaluate_subject("glioma", "g1", "mechanistic", root / "forecasts" / "sub-g1", root / "targets")
    npz.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read target npz"):
        evaluate_subject("glioma", "g1", "mechanistic", root / "forecasts" / "sub-g1", root / "targets")


def test_missing_fit_json_names_file(glioma_case):
    root, _, _ = glioma_case
    fdir = root / "forecasts" / "sub-g1"
    (fdir / "sub-g1_model-mechanistic_desc-fit.json").unlink()
    with pytest.raises(InputError, match="fit json not found"):
        evaluate_subject("glioma", "g1", "mechanistic", fdir, root / "targets")


def _alzheimer_case(root, with_persistence=True):
    regions = ["L_a", "L_b", "R_a", "R_b"]
    obs = np.array([1.0, 2.0, 3.0, 4.0])
    write_target(root / "targets", "a1", "alzheimer", {"suvr": obs}, {"regions": regions, "years": 2.0})
    fdir = root / "forecasts" / "sub-a1"
    fdir.mkdir(parents=True)
    # rows in another order than the target's: must be aligned by name
    pd.DataFrame({"region": regions[::-1], "suvr": (obs + [1, -1, 1, -1])[::-1]}).to_csv(
        fdir / "sub-a1_model-ude_pet.tsv", sep="\t", index=False)
    write_fit(fdir, "a1", "ude", sol_error_vs_fine=0.1, coarse_error_vs_fine=0.3, sol_cost_seconds=2.0)
    if with_persistence:
        pd.DataFrame({"region": regions, "suvr": np.full(4, 1.0)}).to_csv(
            fdir / "sub-a1_model-persistence_pet.tsv", sep="\t", index=False)
    return fdir


def test_alzheimer_rmse_pearson_relative(tmp_path):
    fdir = _alzheimer_case(tmp_path)
    m = as_dict(evaluate_subject("alzheimer", "a1", "ude", fdir, tmp_path / "targets"))
    assert m["rmse_suvr"] == pytest.approx(1.0)
    ref = math.sqrt((0 + 1 + 4 + 9) / 4)
    assert m["rmse_rel_persistence"] == pytest.approx(1.0 / ref)
    assert m["pearson_r"] == pytest.approx(np.corrcoef([2, 1, 4, 3], [1, 2, 3, 4])[0, 1])
    assert m["sol_error_vs_fine"] == 0.1 and m["coarse_error_vs_fine"] == 0.3 and m["sol_cost_seconds"] == 2.0
    assert set(SCORED_METRICS["alzheimer"]) <= set(m)


def test_alzheimer_missing_region_is_an_error(tmp_path):
    fdir = _alzheimer_case(tmp_path, with_persistence=False)
    path = fdir / "sub-a1_model-ude_pet.tsv"
    pd.DataFrame({"region": ["L_a", "L_b", "R_a"], "suvr": [1.0, 2.0, 3.0]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError, match="missing from the forecast, e.g. R_b") as err:
        evaluate_subject("alzheimer", "a1", "ude", fdir, tmp_path / "targets")
    assert err.value.file == str(path)


def test_stroke_dice_volume_and_cli(tmp_path):
    voxel = [2.0, 2.0, 2.0]
    aff = affine_for(voxel)
    target = cube((8, 8, 8), (0, 0, 0), (4, 4, 4))  # 64 voxels of 8 mm^3
    write_target(tmp_path / "targets", "s1", "stroke", {"infarct": target.astype(np.uint8)}, {"voxel_mm": voxel})
    fdir = tmp_path / "forecasts" / "sub-s1"
    save_volume(fdir / "sub-s1_model-residual_desc-infarct_mask.nii.gz", cube((8, 8, 8), (0, 0, 0), (4, 4, 2)), aff, dtype=np.uint8)
    write_fit(fdir, "s1", "residual")
    out = tmp_path / "metrics" / "sub-s1" / "sub-s1_model-residual_metrics.tsv"
    rc = main(["evaluate", "--disorder", "stroke", "--subject", "s1", "--model", "residual",
               "--forecast-dir", str(fdir), "--target", str(tmp_path / "targets"), "--out", str(out)])
    assert rc == 0
    frame = pd.read_csv(out, sep="\t")
    assert list(frame.columns) == TABLE_COLUMNS
    m = as_dict(frame)
    assert m["dice_infarct"] == pytest.approx(2 * 32 / (64 + 32))
    assert m["abs_volume_error_ml_infarct"] == pytest.approx(32 * 8 / 1000)
    assert {k for k in m if not k.endswith("_seconds")} == set(SCORED_METRICS["stroke"])


def test_cli_bad_input_exit_2(tmp_path, capsys):
    rc = main(["evaluate", "--disorder", "stroke", "--subject", "zz", "--model", "residual",
               "--forecast-dir", str(tmp_path), "--target", str(tmp_path / "targets"), "--out", str(tmp_path / "o.tsv")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "subject zz" in err and "sub-zz_desc-target.npz" in err
    assert not (tmp_path / "o.tsv").exists()


@pytest.mark.parametrize("models, extra, words", [
    ("residual,residual", [], "more than once"),
    ("", [], "names no model family"),
    (",", [], "names no model family"),
    ("residul", [], "unknown family residul"),
    ("residual", ["--truth", "no/such/root"], "--truth is not a folder"),
])
def test_cli_refuses_bad_model_lists_and_truth_roots(tmp_path, capsys, models, extra, words):
    out = tmp_path / "o.tsv"
    rc = main(["evaluate", "--disorder", "stroke", "--subject", "s1", "--model", models, "--forecast-dir", str(tmp_path),
               "--target", str(tmp_path / "targets"), *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_rows_say_whether_the_patient_was_treated(glioma_case):
    root, _, _ = glioma_case
    args = ("glioma", "g1", "mechanistic", root / "forecasts" / "sub-g1", root / "targets")
    assert (evaluate_subject(*args)["treated"] == 0).all()
    meta_path = root / "targets" / "sub-g1" / "sub-g1_desc-target.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, treated=True)))
    assert (evaluate_subject(*args)["treated"] == 1).all()
