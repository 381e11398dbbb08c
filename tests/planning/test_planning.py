"""Treatment planning (``neurohybrid.planning``) on tiny synthetic cases: the glioma targets at
equal volume, the stroke reperfusion curve, the Alzheimer's trial, and that planning never needs
the held-out session."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from pathlib import Path
from scipy import ndimage

from neurohybrid.cli import main
from neurohybrid.disorders.base import SubjectData, inputs_path, target_path
from neurohybrid.errors import InputError
from neurohybrid.io import save_volume
from neurohybrid.planning import glioma
from neurohybrid.planning.settings import DEFAULTS, resolve

SPACING = (2.0, 2.0, 3.0)  # anisotropic on purpose: the margin is in mm, not voxels
SHAPE = (26, 24, 18)


def glioma_inputs(subject="g1") -> SubjectData:
    """Brain = an ellipsoid of tissue; the visible tumour an irregular blob (T1Gd core inside a FLAIR
    region) off centre, so the 15 mm margin is clipped by the brain on one side."""
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * h for n, h in zip(SHAPE, SPACING)], indexing="ij"))
    brain = ((grid / np.array([24.0, 22.0, 25.0])[:, None, None, None]) ** 2).sum(axis=0) <= 1.0
    wm = np.where(brain, 0.6, 0.0).astype(np.float32)
    gm = np.where(brain, 0.4, 0.0).astype(np.float32)
    csf = np.zeros(SHAPE, np.float32)
    centre = np.array([10.0, -4.0, 3.0])
    r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    flair = (r <= 6.0) | ((r <= 8.0) & (grid[0] > 12.0))
    t1gd = r <= 3.0
    arrays = dict(wm=wm, gm=gm, csf=csf, ventricle_mm=np.full(SHAPE, 50.0, np.float32),
                  t1gd=np.stack([t1gd & (r < 2), t1gd]), flair=np.stack([flair & (r < 4), flair]))
    meta = dict(sessions=["1", "2"], days=[0.0, 60.0], target_session="3", target_day=120.0,
                affine=np.diag([*SPACING, 1.0]).tolist(), full_shape=list(SHAPE), crop_offset=[0, 0, 0],
                voxel_mm=list(SPACING), ventricle_voxels=0, ventricle_rule="none found")
    return SubjectData(subject, "glioma", arrays, meta)


def visible_distance(inputs) -> np.ndarray:
    a = inputs.arrays
    return ndimage.distance_transform_edt(~(a["flair"][-1] | a["t1gd"][-1]), sampling=SPACING)


def test_standard_target_is_the_margin_in_mm_clipped_to_the_brain():
    inputs = glioma_inputs()
    a = inputs.arrays
    visible = a["flair"][-1] | a["t1gd"][-1]
    brain = glioma.brain_mask(a["wm"], a["gm"], a["csf"])
    target = glioma.standard_target(visible, brain, glioma.distance_to(visible, SPACING), 15.0)
    # brute force: the distance of every voxel centre to the nearest visible voxel centre, in mm
    pts = np.argwhere(np.ones(SHAPE, bool)) * np.array(SPACING)
    vis = np.argwhere(visible) * np.array(SPACING)
    d = np.sqrt(((pts[:, None, :] - vis[None, :, :]) ** 2).sum(-1)).min(axis=1).reshape(SHAPE)
    assert np.array_equal(target, ((d <= 15.0) & brain) | visible)
    assert (target & ~brain).sum() == 0 and target.sum() < (d <= 15.0).sum()  # the clipping acts


def test_personalised_equals_margin_target_when_density_depends_on_distance_only():
    inputs = glioma_inputs()
    d = visible_distance(inputs)
    density = np.exp(-d / 4.0).astype(np.float32)  # any decreasing function of the distance
    plan = glioma.plan_subject(inputs, {"mechanistic": density}, 15.0)
    assert plan["personalised"]["mechanistic"].sum() == plan["standard"].sum()
    assert np.array_equal(plan["personalised"]["mechanistic"], plan["standard"])
    # a density shifted away from the visible tumour's shape gives another target of the same volume
    shifted = np.roll(density, 3, axis=0)
    other = glioma.plan_subject(inputs, {"ude": shifted}, 15.0)
    assert other["personalised"]["ude"].sum() == other["standard"].sum()
    assert not np.array_equal(other["personalised"]["ude"], other["standard"])
    rows = {(m, k): (v, u) for m, k, v, u in other["rows"]}
    assert rows[("ude", "ctv_volume")][1] == "ml" and rows[("standard_margin", "margin")] == (15.0, "mm")
    assert rows[("ude", "ctv_volume")][0] == pytest.approx(rows[("standard_margin", "ctv_volume")][0])


def write_glioma_case(root, inputs, densities):
    inputs.save(inputs_path(root / "inputs", inputs.subject))
    fdir = root / "forecasts" / f"sub-{inputs.subject}"
    fdir.mkdir(parents=True)
    for family, u in densities.items():
        save_volume(fdir / f"sub-{inputs.subject}_model-{family}_desc-celldensity.nii.gz", u, np.diag([*SPACING, 1.0]))
    return fdir


def test_plan_glioma_reads_no_held_out_data_and_evaluate_scores_coverage(tmp_path):
    inputs = glioma_inputs()
    d = visible_distance(inputs)
    fdir = write_glioma_case(tmp_path, inputs, {"mechanistic": np.exp(-d / 4.0).astype(np.float32),
                                                "residual": np.roll(np.exp(-d / 4.0), 2, axis=1).astype(np.float32)})
    assert not (tmp_path / "targets").exists()  # no held-out session anywhere: planning must not need it
    out = tmp_path / "plans" / "sub-g1"
    assert main(["plan", "glioma", "--subject", "g1", "--inputs", str(tmp_path / "inputs"), "--forecast-dir", str(fdir),
                 "--out-dir", str(out)]) == 0
    masks = {p.name: np.asarray(__import__("nibabel").load(str(p)).dataobj) for p in out.glob("*_desc-ctv_mask.nii.gz")}
    assert set(masks) == {f"sub-g1_model-{m}_desc-ctv_mask.nii.gz" for m in ("standard_margin", "mechanistic", "residual")}
    assert len({int(m.sum()) for m in masks.values()}) == 1  # equal volume
    table = pd.read_csv(out / "sub-g1_desc-plan.tsv", sep="\t")
    assert list(table.columns) == ["subject", "disorder", "model", "measure", "value", "unit"]
    assert table["unit"].notna().all() and {"standard_margin", "mechanistic", "residual"} <= set(table["model"])

    # the held-out session (made only now): half of its FLAIR tumour inside the standard target
    std = masks["sub-g1_model-standard_margin_desc-ctv_mask.nii.gz"].astype(bool)
    inside, outside = np.argwhere(std & ~(inputs.arrays["flair"][-1])), np.argwhere(~std)
    flair = np.zeros(SHAPE, bool)
    flair[tuple(inside[:10].T)] = True
    flair[tuple(outside[:10].T)] = True
    t1gd = np.zeros(SHAPE, bool)
    target = SubjectData("g1", "glioma", dict(flair=flair, t1gd=t1gd),
                         dict(affine=inputs.meta["affine"], voxel_mm=list(SPACING), day=120.0, session="3"))
    target.save(target_path(tmp_path / "targets", "g1"))
    from neurohybrid.evaluation.scoring import plan_coverage

    cov = plan_coverage("g1", out, tmp_path / "targets")
    got = {(r.model, r.metric): (r.value, r.missing_reason) for r in cov.itertuples()}
    assert got[("standard_margin", "ctv_coverage_flair")][0] == pytest.approx(0.5)
    assert math.isnan(got[("standard_margin", "ctv_coverage_t1gd")][0])
    assert got[("standard_margin", "ctv_coverage_t1gd")][1] == "held-out t1gd mask is empty"
    assert {m for m, _ in got} == {"standard_margin", "mechanistic", "residual"}


# ---------------------------------------------------------------------------------------------
# stroke

def stroke_inputs(reperfusion_h=6.0) -> SubjectData:
    shape = (10, 8, 4)
    x = np.linspace(0.0, 1.0, shape[0])[:, None, None] * np.ones(shape)
    cbf = (4.0 + 50.0 * x).astype(np.float32)  # from deep ischaemia to normal flow
    core = np.zeros(shape, bool)
    core[0, :, :] = True
    arrays = dict(cbf=cbf, wm=np.full(shape, 0.3, np.float32), gm=np.full(shape, 0.7, np.float32), core=core)
    meta = dict(hours_acute=2.5, hours_followup=30.0, reperfusion_h=reperfusion_h, voxel_mm=[4.0, 4.0, 4.0],
                affine=np.diag([4.0, 4.0, 4.0, 1.0]).tolist(), full_shape=list(shape), crop_offset=[0, 0, 0])
    return SubjectData("s1", "stroke", arrays, meta)


def test_stroke_curve_is_monotone_and_never_equals_the_no_reperfusion_forecast():
    from neurohybrid.disorders.stroke import mechanistic as mech
    from neurohybrid.planning import stroke

    s = mech.settings({"sloppy": True})
    inputs = stroke_inputs()
    ps = dict(DEFAULTS["stroke"], max_reperfusion_h=12.0, step_h=1.5)
    fits = {"mechanistic": {"parameters": {"sensitivity": 1.0, "sensitivity_interval": [0.8, 1.25]}},
            "amortised": {"parameters": {"sensitivity": 1.1, "sensitivity_interval": [math.nan, math.nan]}}}
    plan = stroke.plan_subject(inputs, fits, ps, s)
    assert plan["times"][0] == 2.5 and plan["times"][-1] == 12.0
    curve = pd.DataFrame(plan["curves"], columns=stroke.CURVE_COLUMNS)
    for family, fit in fits.items():
        c = curve[curve["model"] == family]
        vol = c["volume_ml"].to_numpy()
        assert np.all(np.diff(vol) >= 0), vol  # later reperfusion (and never, last) never saves more tissue
        assert vol[-1] > vol[0]  # this case has tissue to save
        # "never" is the forecast without reperfusion, as the family's forecast code makes it
        no_rep = SubjectData("s1", "stroke", inputs.arrays, dict(inputs.meta, reperfusion_h=None))
        dead = mech.forecast_dead(no_rep, mech.StrokeFit(fit["parameters"]["sensitivity"]), s)
        expected = mech.infarct_from_dead(dead, inputs.arrays["core"]).sum() * 64.0 / 1000.0
        assert math.isnan(c["reperfusion_h"].iloc[-1]) and vol[-1] == pytest.approx(expected)
    mech_c = curve[curve["model"] == "mechanistic"]
    assert np.all(mech_c["volume_ml_low"] <= mech_c["volume_ml"]) and np.all(mech_c["volume_ml"] <= mech_c["volume_ml_high"])
    assert curve[curve["model"] == "amortised"]["volume_ml_low"].isna().all()  # no interval, no band
    rows = {(m, k): (v, u) for m, k, v, u in plan["rows"]}
    assert rows[("acute_images", "core_volume")] == (pytest.approx(32 * 0.064), "ml")
    assert rows[("mechanistic", "salvageable_volume")][0] == pytest.approx(mech_c["volume_ml"].iloc[-1] - mech_c["volume_ml"].iloc[0])
    assert rows[("mechanistic", "salvage_lost_per_hour")][1] == "ml/h"
    hypo = rows[("acute_images", "hypoperfused_volume")][0]
    assert rows[("acute_images", "mismatch_ratio")][0] == pytest.approx(hypo / rows[("acute_images", "core_volume")][0])


# ---------------------------------------------------------------------------------------------
# Alzheimer's

def ad_subject():
    from neurohybrid.disorders.alzheimer.model import Subject
    from neurohybrid.solvers.network import laplacian

    rng = np.random.default_rng(0)
    regions = ["L_entorhinal", "R_entorhinal", "L_fusiform", "R_fusiform", "L_inferiortemporal", "R_precuneus"]
    n = len(regions)
    w = rng.uniform(0.1, 1.0, (n, n))
    w = np.triu(w, 1) + np.triu(w, 1).T
    suvr = np.array([[1.6, 1.5, 1.1, 1.05, 1.0, 1.0], [1.75, 1.65, 1.15, 1.1, 1.02, 1.0], [1.9, 1.8, 1.2, 1.15, 1.05, 1.01]])
    return Subject("a1", regions, suvr, np.array([0.0, 1.0, 2.0]), laplacian(w), np.full(n, 1000.0),
                   rng.uniform(-50, 50, (n, 3)), target_years=3.5)


def test_trial_with_zero_reduction_is_the_plain_forecast():
    import torch

    from neurohybrid.disorders.alzheimer.model import forecast
    from neurohybrid.disorders.alzheimer.settings import Settings
    from neurohybrid.planning import alzheimer

    subject, s = ad_subject(), Settings.from_config({"sloppy": True})
    theta = np.array([0.05, 0.4, 1.5])
    fits = {"mechanistic": {"parameters": {"kappa": 0.05, "alpha": 0.4, "suvr_amplitude": 1.5,
                                           "kappa_sd": 0.01, "alpha_sd": 0.05, "suvr_amplitude_sd": 0.1}}}
    ps = dict(DEFAULTS["alzheimer"], meta_region=["L_fusiform", "R_fusiform", "L_inferiortemporal"],
              positivity_suvr=1.25, production_reduction=0.0, max_years=15.0, horizons_years=[1.5, 5.0])
    plan = alzheimer.plan_subject(subject, s, fits, ps)
    plain, trial, band = plan["curves"]["mechanistic"]
    assert np.array_equal(plain, trial)
    rows = {(m, k): v for m, k, v, _ in plan["rows"]}
    assert rows[("mechanistic", "delay_bought")] == 0.0
    assert 0 < rows[("mechanistic", "years_to_positivity")] < 15.0
    # the planning simulator is the family's forecast: at the held-out time (1.5 years after the last visit)
    traj = pd.DataFrame(plan["trajectory"], columns=alzheimer.TRAJECTORY_COLUMNS)
    at = traj[(traj["model"] == "mechanistic") & (traj["years_after_last_visit"] == 1.5)].set_index("region")["suvr"]
    pred, _, _ = forecast(theta, subject, s, torch.device("cpu"))
    assert np.allclose(at.loc[subject.regions].to_numpy(), pred.cpu().numpy(), atol=1e-5)
    sel = traj[traj["model"] == "mechanistic"]
    assert (sel["suvr_low"] <= sel["suvr_high"]).all()

    curve = pd.DataFrame(alzheimer.curve_rows(plan), columns=alzheimer.CURVE_COLUMNS)
    assert np.allclose(curve["suvr"], curve["suvr_trial"]) and curve["years_after_last_visit"].iloc[-1] == 15.0

    # lowering production delays the crossing
    treated = alzheimer.plan_subject(subject, s, fits, dict(ps, production_reduction=0.5))
    rows = {(m, k): v for m, k, v, _ in treated["rows"]}
    assert rows[("mechanistic", "delay_bought")] > 0


def test_crossing_time():
    from neurohybrid.planning.alzheimer import crossing_time

    years = np.array([0.0, 1.0, 2.0])
    assert crossing_time(years, np.array([1.0, 1.2, 1.4]), 1.3) == pytest.approx(1.5)
    assert crossing_time(years, np.array([1.4, 1.5, 1.6]), 1.3) == 0.0
    assert crossing_time(years, np.array([1.0, 1.1, 1.2]), 1.3) == math.inf


def test_planning_settings_match_the_config_and_refuse_unknown_keys():
    repo = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    assert resolve(config) == DEFAULTS  # config.yaml states the code's defaults
    assert resolve({"planning": {"glioma": {"margin_mm": 20}}})["glioma"]["margin_mm"] == 20
    with pytest.raises(InputError, match="planning.glioma.margin"):
        resolve({"planning": {"glioma": {"margin": 20}}})
