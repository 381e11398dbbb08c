"""Glioma radiotherapy: the treatment table, and every physics family forecasting under it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy import ndimage

from neurohybrid.disorders.base import SubjectData, get_disorder
from neurohybrid.disorders.glioma import mechanistic as mech
from neurohybrid.disorders.glioma import treatment as rt
from neurohybrid.errors import InputError
from neurohybrid.solvers.glioma import Radiotherapy, gaussian_seed, observe, simulate_glioma
from test_glioma_models import DAYS, FAST, SHAPE, SPACE, VOX, _save, tissue_maps, write_cohort

ALPHA = 0.03  # the virtual patient's radiosensitivity, also given to the models (rt_alpha)
CONFIG = copy.deepcopy(FAST)
CONFIG["glioma"]["rt_alpha"] = ALPHA
# 15 fractions of 2 Gy, 5 a week, from day 28: inside the forecast gap (day 25 -> 50), last on day 46
COURSE = rt.Course(28.0, 15, 2.0, 5)


def _affine():
    affine = np.diag([VOX, VOX, VOX, 1.0])
    affine[:3, 3] = -VOX * (np.array(SHAPE) - 1) / 2
    return affine


def write_treated(root, sub="t1", course=COURSE, after=1):
    """A phantom subject treated after session index ``after`` (0-based): target = its FLAIR there +
    6 mm; the later sessions are simulated under the LQ kill. Returns (bids, preproc)."""
    bids, preproc, truth = write_cohort(root, [sub])
    p = truth[sub]
    wm, gm, _ = tissue_maps()
    u0 = gaussian_seed(SHAPE, (VOX,) * 3, p["center"], sigma_mm=2.0).astype(np.float32)
    u = simulate_glioma(wm, gm, u0, spacing=(VOX,) * 3, dw=p["dw"], rho=p["rho"], days=p["t0"] + DAYS[after], threads=1)
    target = ndimage.distance_transform_edt(~observe(u)[1], sampling=(VOX,) * 3) <= 6.0
    therapy = Radiotherapy(course.fraction_days(), course.dose_gy, ALPHA, ALPHA / 10.0, target)
    for k in range(after + 1, len(DAYS)):
        u = simulate_glioma(wm, gm, u, spacing=(VOX,) * 3, dw=p["dw"], rho=p["rho"], days=DAYS[k] - DAYS[k - 1], threads=1,
                            radiotherapy=therapy.window(DAYS[k - 1], DAYS[k]))
        t1, fl = observe(u)
        ses = f"{k + 1:02d}"
        d = preproc / f"sub-{sub}" / f"ses-{ses}" / "anat"
        _save(d / f"sub-{sub}_ses-{ses}_space-{SPACE}_res-model_desc-T1Gd_mask.nii.gz", t1.astype(np.uint8), _affine())
        _save(d / f"sub-{sub}_ses-{ses}_space-{SPACE}_res-model_desc-FLAIR_mask.nii.gz", fl.astype(np.uint8), _affine())
    # the target: raw (T1w space) in the lesion derivatives, and as preprocessing maps it
    ses = f"{after + 1:02d}"
    _save(bids / rt.target_path(sub, ses), target.astype(np.uint8), _affine())
    _save(preproc / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_space-{SPACE}_res-model_desc-RTtarget_mask.nii.gz",
          target.astype(np.uint8), _affine())
    rt.write_table(bids, sub, [dataclass_replace(course, target_mask=rt.target_path(sub, ses), target_session=ses)])
    return bids, preproc


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def untreated_copy(inputs: SubjectData) -> SubjectData:
    arrays = {k: v for k, v in inputs.arrays.items() if k != "rt_target"}
    return SubjectData(inputs.subject, inputs.disorder, arrays, dict(inputs.meta, treatment=[], treated=False))


@pytest.fixture(scope="module")
def treated(tmp_path_factory):
    root = tmp_path_factory.mktemp("treated")
    bids, preproc = write_treated(root)
    return get_disorder("glioma").build_inputs("t1", bids, preproc, CONFIG)[0]


def _flair_ml(mask):
    return float(np.asarray(mask).sum()) * VOX**3 / 1000.0


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

def test_fraction_schedule_is_five_a_week():
    days = rt.Course(10.0, 30, 2.0, 5).fraction_days()
    assert len(days) == 30 and days[:6] == [10.0, 11.0, 12.0, 13.0, 14.0, 17.0] and days[-1] == 10.0 + 39.0


def test_table_round_trips(tmp_path):
    bids, _, _ = write_cohort(tmp_path, ["r1"])
    _save(bids / rt.target_path("r1", "01"), np.ones(SHAPE, np.uint8), _affine())
    courses = [rt.Course(3.0, 30, 2.0, 5, rt.target_path("r1", "01"), "01"), rt.Course(40.0, 5, 4.0, 5)]
    path = rt.write_table(bids, "r1", courses)
    assert path.with_suffix(".json").exists()
    assert rt.read_table(bids, "r1", [("01", 0.0), ("02", 25.0), ("03", 50.0)]) == courses
    # a session label as the start day: that session's day
    path.write_text("start_day\tfractions\tdose_per_fraction_gy\tfractions_per_week\ttarget_mask\nses-02\t5\t2\t5\tn/a\n")
    assert rt.read_table(bids, "r1", [("01", 0.0), ("02", 25.0)]) == [rt.Course(25.0, 5, 2.0, 5)]


@pytest.mark.parametrize("row, problem", [
    ("3\t0\t2\t5\tn/a", "fractions must be an integer in 1..1000"),
    ("3\t30\tabc\t5\tn/a", "dose_per_fraction_gy must be a number"),
    ("3\t30\t2\t9\tn/a", "fractions_per_week must be an integer in 1..7"),
    ("ses-07\t30\t2\t5\tn/a", "start_day ses-07 is not a session"),
    ("3\t30\t2\t5\tmask.nii.gz", "target_mask 'mask.nii.gz' must be n/a or"),
    ("3\t30\t2\t5\t" + rt.target_path("x1", "01"), "target_mask file"),
])
def test_bad_table_row_names_subject_file_and_problem(tmp_path, row, problem):
    bids, _, _ = write_cohort(tmp_path, ["x1"])
    path = rt.table_path(bids, "x1")
    path.write_text("\t".join(rt.COLUMNS) + "\n" + row + "\n")
    with pytest.raises(InputError) as err:
        rt.read_table(bids, "x1", [("01", 0.0), ("02", 25.0)])
    msg = str(err.value)
    assert problem in msg and "row 2" in msg and "x1" in msg and str(path) in msg


def test_table_missing_a_column(tmp_path):
    bids, _, _ = write_cohort(tmp_path, ["x2"])
    rt.table_path(bids, "x2").write_text("start_day\tfractions\n3\t30\n")
    with pytest.raises(InputError, match="lacks column"):
        rt.read_table(bids, "x2", [("01", 0.0)])


# ------------------------------------------------------------------------------------------------
# forecasts under the treatment
# ------------------------------------------------------------------------------------------------

def test_inputs_carry_the_treatment(treated):
    meta = treated.meta
    assert meta["treated"] and len(meta["treatment"]) == 1
    assert meta["treatment"][0]["fraction_days"] == COURSE.fraction_days()
    assert treated.arrays["rt_target"].shape == (1,) + SHAPE and treated.arrays["rt_target"].any()


def test_forecast_without_the_treatment_over_predicts_a_treated_patient(treated, tmp_path):
    disorder = get_disorder("glioma")
    _, target = disorder.build_inputs("t1", *write_treated(tmp_path), CONFIG)
    observed = _flair_ml(target.arrays["flair"])
    fam = disorder.family("mechanistic", CONFIG, "cpu")
    with_rt = fam.forecast(treated, None)
    without = fam.forecast(untreated_copy(treated), None)
    v_with, v_without = _flair_ml(with_rt.outputs["flair"]), _flair_ml(without.outputs["flair"])
    assert v_without > observed and v_without > v_with
    assert abs(v_with - observed) < abs(v_without - observed)
    assert with_rt.extra["fractions_in_forecast_gap"] == 15 and with_rt.extra["rt_alpha"] == ALPHA


def test_residual_with_zero_correction_equals_mechanistic_under_treatment(treated):
    """The residual hybrid keeps the LQ kill in its mechanistic part, step for step the solver's."""
    from neurohybrid.disorders.glioma.families import ResidualNet

    disorder = get_disorder("glioma")
    ref = disorder.family("mechanistic", CONFIG, "cpu").forecast(treated, None)
    zero = {"state_dict": ResidualNet(5, CONFIG["glioma"]["hidden"]).state_dict()}
    res = disorder.family("residual", CONFIG, "cpu").forecast(treated, zero)
    np.testing.assert_allclose(res.outputs["celldensity"], ref.outputs["celldensity"], atol=2e-5)
    plain = disorder.family("residual", CONFIG, "cpu").forecast(untreated_copy(treated), zero)
    assert plain.outputs["celldensity"].sum() > 1.05 * res.outputs["celldensity"].sum()


def test_ude_and_sol_fine_solver_apply_the_treatment(treated):
    from neurohybrid.disorders.glioma.families import SolForecaster, _Case, node_rollout
    from neurohybrid.disorders.networks import VoxelCorrection
    from neurohybrid.hybrid.neural_ode import HybridDynamics, NeuralODE

    disorder = get_disorder("glioma")
    s = mech.settings(CONFIG)
    ref = disorder.family("mechanistic", CONFIG, "cpu").forecast(treated, None).outputs["celldensity"]
    fam = disorder.family("ude", CONFIG, "cpu")
    fit = mech.calibrate_inputs(treated, s, seed=0)
    case = fam.case(treated, fit)
    assert len(case.kills) == 15
    model = NeuralODE(HybridDynamics(lambda u: u * 0, VoxelCorrection(4, hidden=4)), method="euler")
    torch_zero(model.dynamics.correction)
    import torch

    with torch.no_grad():
        ude = node_rollout(model, case, s, "cpu").numpy()
        ude_plain = node_rollout(model, _Case(case.wm, case.gm, case.cov, case.u_last, case.gap, fit, case.spacing), s,
                                 "cpu").numpy()
    # explicit Euler of the unsplit equation vs the solver's Strang steps: the splitting error only
    assert np.abs(ude - ref).max() < 0.05
    assert ude_plain.sum() > 1.05 * ude.sum()
    # SOL's fine reference stepper with the kills = the solver
    d_last, d_target = mech.forecast_days(treated)
    kills = rt.Treatment.of(treated, s).kill_factors(d_last, d_target, SHAPE)
    runner = SolForecaster.__new__(SolForecaster)
    runner.kills, runner.gap = kills, d_target - d_last
    from neurohybrid.solvers.glioma import GliomaStepper, _bbox

    wm, gm = treated.arrays["wm"], treated.arrays["gm"]
    runner.fbox = _bbox((wm + gm) > 0)
    runner.wm_f = wm
    runner.fine_stepper = GliomaStepper(wm[runner.fbox], gm[runner.fbox], np.zeros_like(wm[runner.fbox]), spacing=(VOX,) * 3,
                                        dw=fit.dw, rho=fit.rho, max_rho_dt=float(s["max_rho_dt"]))
    np.testing.assert_allclose(runner.fine(case.u_last), ref, atol=2e-3)


def test_the_fit_uses_a_treatment_between_the_observed_sessions(tmp_path):
    """Treated between sessions 1 and 2: a fit that ignores it mistakes the kill for slow growth and
    under-predicts session 3; the fit that knows it forecasts closer."""
    disorder = get_disorder("glioma")
    inputs, target = disorder.build_inputs("t1", *write_treated(tmp_path, course=rt.Course(3.0, 15, 2.0, 5), after=0),
                                           CONFIG)
    observed = _flair_ml(target.arrays["flair"])
    fam = disorder.family("mechanistic", CONFIG, "cpu")
    with_rt = fam.forecast(inputs, None)
    without = fam.forecast(untreated_copy(inputs), None)
    assert with_rt.extra["fractions_before_last_session"] == 15 and with_rt.extra["fractions_in_forecast_gap"] == 0
    v_with, v_without = _flair_ml(with_rt.outputs["flair"]), _flair_ml(without.outputs["flair"])
    assert abs(v_with - observed) < abs(v_without - observed)
    assert with_rt.parameters["rho"] != without.parameters["rho"]


def test_sol_coarse_and_corrected_paths_apply_the_treatment(treated):
    import torch
    from test_glioma_sol import _random_checkpoint

    from neurohybrid.disorders.glioma.families import SolForecaster

    s = mech.settings(CONFIG)
    fam = get_disorder("glioma").family("sol", dict(CONFIG, glioma=dict(CONFIG["glioma"], sol_step_days=10.0)),
                                        torch.device("cpu"))
    fit = mech.calibrate_inputs(treated, s, seed=0)
    d_last, d_target = mech.forecast_days(treated)
    u_last = mech.state_at(treated, fit, [d_last], s)[0]
    kills = rt.Treatment.of(treated, s).kill_factors(d_last, d_target, SHAPE)
    ckpt = _random_checkpoint(fam)
    runner = SolForecaster(fam, treated.arrays, (VOX,) * 3, fit.dw, fit.rho, d_target - d_last, ckpt, kills)
    plain = SolForecaster(fam, treated.arrays, (VOX,) * 3, fit.dw, fit.rho, d_target - d_last, ckpt)
    # the Numba forecast and the torch modules agree under the treatment too
    np.testing.assert_allclose(runner.sol(u_last), runner.sol_torch(u_last), atol=2e-5)
    np.testing.assert_allclose(runner.coarse(u_last), runner.coarse_torch(u_last), atol=2e-6)
    assert plain.coarse(u_last).sum() > 1.05 * runner.coarse(u_last).sum()
    assert plain.sol(u_last).sum() > 1.05 * runner.sol(u_last).sum()


def torch_zero(module):
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def test_an_untreated_forecast_is_unchanged(treated):
    """Untreated (or treated only after the forecast day): exactly the plain solver from the fit."""
    disorder = get_disorder("glioma")
    s = mech.settings(CONFIG)
    plain = untreated_copy(treated)
    out = disorder.family("mechanistic", CONFIG, "cpu").forecast(plain, None)
    fit = mech.calibrate_inputs(plain, s, seed=0)
    d_last, d_target = mech.forecast_days(plain)
    a = plain.arrays
    u0 = mech.initial_density(SHAPE, (VOX,) * 3, fit.center, s)
    ref = simulate_glioma(a["wm"], a["gm"], u0, spacing=(VOX,) * 3, dw=fit.dw, rho=fit.rho, days=fit.t0 + d_target,
                          dg_ratio=float(s["dg_ratio"]), save_days=[fit.t0 + d_last, fit.t0 + d_target],
                          max_rho_dt=float(s["max_rho_dt"]), threads=1)[-1]
    assert np.array_equal(out.outputs["celldensity"], ref)
    assert "treated" not in out.extra
    late = SubjectData(plain.subject, plain.disorder, dict(treated.arrays),
                       dict(treated.meta, treatment=[dict(treated.meta["treatment"][0],
                                                          fraction_days=[60.0 + d for d in range(5)])]))
    assert np.array_equal(disorder.family("mechanistic", CONFIG, "cpu").forecast(late, None).outputs["celldensity"], ref)
