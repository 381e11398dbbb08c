"""Stroke model families on a tiny synthetic cohort made with the Xue 2021 solver itself."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from neurohybrid.disorders.base import SubjectData, get_disorder, target_path
from neurohybrid.disorders.stroke import mechanistic as mech
from neurohybrid.errors import InputError
from neurohybrid.solvers.stroke import normal_cbf, simulate_tissue_death

SPACE = "MNI152NLin2009cSym"
SHAPE = (16, 16, 16)
VOX = 2.0
FAST = {"sloppy": True, "seed": 0, "device": "cpu",
        "stroke": {"epochs": 4, "hidden": 4, "sol_step_hours": 6.0, "time_limit_s": 300.0}}


def _save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def write_cohort(root, subjects, reperfusion=(6.0, None, 8.0, 5.0), t_acute=3.0):
    bids, preproc = root / "bids", root / "preproc"
    affine = np.diag([VOX, VOX, VOX, 1.0])
    affine[:3, 3] = -VOX * (np.array(SHAPE) - 1) / 2
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    brain = (x / 7.0) ** 2 + (y / 7.0) ** 2 + (z / 6.5) ** 2 <= 1.0
    wm = np.where(brain, 0.3 + 0.4 * (np.abs(x) < 3), 0.0).astype(np.float32)
    gm = np.where(brain, 1.0 - wm, 0.0).astype(np.float32)
    truth = {}
    rows = ["participant_id\tdisorder\tage\tsex\tonset_to_reperfusion_h"]
    for i, sub in enumerate(subjects):
        rng = np.random.default_rng(7 + i)
        sigma = float(rng.uniform(0.85, 1.2))
        c = rng.uniform(-2, 2, 3)
        r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        cbf = np.where(brain, normal_cbf(wm) * (1.0 - 0.85 * np.exp(-r2 / (2 * 3.0 ** 2))), 0.0)
        rep = reperfusion[i % len(reperfusion)]
        t_follow = 24.0
        out = simulate_tissue_death(cbf / sigma, hours=t_follow, reperfusion_h=rep, cbf_after=normal_cbf(wm) / sigma,
                                    wm_fraction=wm, save_hours=[t_acute, t_follow], dt_s=60.0, threads=1)
        core = (out["dead"][0] > 0.8) & brain
        final = ((out["dead"][1] > 0.8) & brain) | core
        truth[sub] = dict(sigma=sigma)
        rows.append(f"sub-{sub}\tstroke\t70\tM\t{'n/a' if rep is None else rep}")
        sdir = bids / f"sub-{sub}"
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / f"sub-{sub}_sessions.tsv").write_text(f"session_id\thours_since_onset\nses-acute\t{t_acute}\nses-followup\t{t_follow}\n")
        anat = preproc / f"sub-{sub}" / "anat"
        _save(anat / f"sub-{sub}_space-{SPACE}_res-model_label-GM_probseg.nii.gz", gm, affine)
        _save(anat / f"sub-{sub}_space-{SPACE}_res-model_label-WM_probseg.nii.gz", wm, affine)
        for ses, mask in (("acute", core), ("followup", final)):
            d = preproc / f"sub-{sub}" / f"ses-{ses}" / "anat"
            _save(d / f"sub-{sub}_ses-{ses}_space-{SPACE}_res-model_desc-infarct_mask.nii.gz", mask.astype(np.uint8), affine)
        _save(preproc / f"sub-{sub}" / "ses-acute" / "perf" / f"sub-{sub}_ses-acute_space-{SPACE}_res-model_cbf.nii.gz",
              cbf.astype(np.float32), affine)
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    return bids, preproc, truth


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("stroke")
    bids, preproc, truth = write_cohort(root, ["s1", "s2", "s3"])
    disorder = get_disorder("stroke")
    data = {s: disorder.build_inputs(s, bids, preproc, FAST) for s in truth}
    return dict(bids=bids, preproc=preproc, truth=truth, data=data)


def test_inputs(cohort):
    inputs, target = cohort["data"]["s2"]
    assert inputs.meta["reperfusion_h"] is None and cohort["data"]["s1"][0].meta["reperfusion_h"] == 6.0
    assert inputs.meta["hours_acute"] == 3.0 and inputs.meta["hours_followup"] == 24.0
    assert set(inputs.arrays) == {"cbf", "wm", "gm", "core"} and inputs.arrays["core"].any()
    assert target.arrays["infarct"].sum() > inputs.arrays["core"].sum()


def test_bad_reperfusion_time(cohort, tmp_path):
    bids, preproc, _ = write_cohort(tmp_path, ["b1"])
    (bids / "participants.tsv").write_text("participant_id\tdisorder\tonset_to_reperfusion_h\nsub-b1\tstroke\tsoon\n")
    with pytest.raises(InputError, match="b1.*participants.tsv.*onset_to_reperfusion_h"):
        get_disorder("stroke").build_inputs("b1", bids, preproc, {})


def test_calibration_recovers_sensitivity(cohort):
    """The acute core alone pins sigma: at 3 h, which voxels crossed D = 0.8 depends steeply on
    CBF / sigma. Tolerance 10%: the core is a binary mask on a 2 mm grid of a smooth CBF dip, so
    sigma is known to about the flow step between neighbouring voxels at the core border."""
    s = mech.settings({})
    for sub in ("s1", "s2", "s3"):
        fit = mech.calibrate(cohort["data"][sub][0], s)
        assert fit.sensitivity == pytest.approx(cohort["truth"][sub]["sigma"], rel=0.1)
        assert fit.interval[0] <= fit.sensitivity <= fit.interval[1]


def test_mechanistic_forecast_matches_truth_model(cohort):
    """With the calibrated sigma, the forecast final infarct overlaps the synthetic one closely."""
    inputs, target = cohort["data"]["s1"]
    fc = get_disorder("stroke").family("mechanistic", {}, "cpu").forecast(inputs, None)
    y = target.arrays["infarct"]
    dice = 2 * (fc.outputs["infarct"] & y).sum() / (fc.outputs["infarct"].sum() + y.sum())
    assert dice > 0.85


def test_fitted_parameters_are_those_with_a_ground_truth(cohort):
    """Parameter recovery compares like with like: the fit's parameters are sigma (truth:
    disease.sensitivity, 1 in the generator) and its interval; the loss and timings sit elsewhere."""
    from neurohybrid.evaluation.metrics import match_parameters, parameter_errors
    from neurohybrid.synth.stroke import TISSUE_SENSITIVITY

    inputs, _ = cohort["data"]["s1"]
    fc = get_disorder("stroke").family("mechanistic", {}, "cpu").forecast(inputs, None)
    assert set(fc.parameters) == {"sensitivity", "sensitivity_interval"}
    assert "calibration_loss" in fc.extra and fc.fit_seconds > 0
    truth = {"disease": {"sensitivity": TISSUE_SENSITIVITY, "collateral_strength": 0.5, "collateral_tau_h": 2.0,
                         "inflow_scale": 0.3, "onset_to_reperfusion_h": 6.0, "followup_h": 120.0}, "voxel_mm": 2.0}
    assert set(match_parameters(fc.parameters, truth)) == {"sensitivity"}
    err = parameter_errors(fc.parameters, truth)
    assert err["param_abs_error_sensitivity"] == pytest.approx(abs(fc.parameters["sensitivity"] - 1.0))


TRAINED = ["data_driven", "residual", "ude", "sol", "sol_precomputed", "amortised", "amortised_residual"]


@pytest.mark.parametrize("family", TRAINED)
def test_family_trains_and_forecasts(cohort, family):
    fam = get_disorder("stroke").family(family, FAST, torch.device("cpu"))
    torch.manual_seed(0)
    trained = fam.train([cohort["data"]["s1"], cohort["data"]["s2"]])
    hist = trained.get("history") or trained.get("amortised_history")
    # loss decrease is required where there is something to learn (this cohort is made by the
    # mechanistic model itself: the corrections start exact); see test_stroke_hybrids and
    # test_data_driven_loss_halves
    assert len(hist) >= 2 and np.all(np.isfinite(hist)), hist
    if family in ("residual", "ude", "amortised_residual"):
        assert "val_history" in trained and "best_epoch" in trained
    if family in ("residual", "ude", "sol", "sol_precomputed"):
        assert trained["sigma_prior"]["source"] == "fold prior"
    fc = fam.forecast(cohort["data"]["s3"][0], trained)
    assert fc.outputs["infarct"].shape == SHAPE and fc.outputs["infarct"].dtype == bool
    assert fc.outputs["infarct"].any()
    assert 0.0 <= fc.outputs["dead"].min() and fc.outputs["dead"].max() <= 1.0
    if family.startswith("sol"):
        assert 0 <= fc.extra["sol_error_vs_fine"] < 0.5 and np.isfinite(fc.extra["coarse_error_vs_fine"])
        assert fc.extra["sol_cost_seconds"] > 0 and fc.extra["fine_cost_seconds"] > 0 and fc.extra["coarse_cost_seconds"] > 0
        assert isinstance(fc.extra["use_correction"], bool) and "sol_error" not in fc.extra


def test_data_driven_loss_halves(cohort):
    cfg = {**FAST, "stroke": {**FAST["stroke"], "epochs": 40}}
    fam = get_disorder("stroke").family("data_driven", cfg, "cpu")
    torch.manual_seed(0)
    hist = fam.train([cohort["data"]["s1"], cohort["data"]["s2"]])["history"]
    assert min(hist) <= 0.5 * hist[0], hist


def test_mechanistic_trains_a_sigma_prior(cohort):
    fam = get_disorder("stroke").family("mechanistic", FAST, "cpu")
    assert fam.trains_across_subjects
    trained = fam.train([cohort["data"]["s1"], cohort["data"]["s2"]])
    prior = trained["sigma_prior"]
    assert prior["subjects"] == ["s1", "s2"] and len(prior["values"]) == 2
    for sub, value in zip(prior["subjects"], prior["values"]):
        assert value == pytest.approx(cohort["truth"][sub]["sigma"], rel=0.1)
    fc = fam.forecast(cohort["data"]["s3"][0], trained)  # s3 has a core: its own sigma, identified
    assert fc.extra["sigma_identified"] is True and fc.extra["sigma_source"] == "acute core"


def test_zero_correction_equals_mechanistic(cohort):
    from neurohybrid.disorders.networks import TinyCNN
    from neurohybrid.disorders.stroke.families import N_FEATURES, RateCorrection

    inputs, _ = cohort["data"]["s1"]
    d = get_disorder("stroke")
    ref = d.family("mechanistic", FAST, "cpu").forecast(inputs, None)
    res = d.family("residual", FAST, "cpu").forecast(inputs, {"state_dict": TinyCNN(N_FEATURES, 1, 4, 3).state_dict()})
    np.testing.assert_allclose(res.outputs["dead"], ref.outputs["dead"], atol=1e-4)
    assert (res.outputs["infarct"] == ref.outputs["infarct"]).all()
    ude = d.family("ude", FAST, "cpu").forecast(
        inputs, {"state_dict": RateCorrection(8).state_dict()})
    np.testing.assert_allclose(ude.outputs["dead"], ref.outputs["dead"], atol=1e-4)


def test_residual_trains_on_voxel_subsets(cohort):
    """Training solves the per-voxel model on random subsets of the candidate voxels: on a subset
    it gives exactly the full solve's values there (the CNN still sees the whole image)."""
    from neurohybrid.disorders.networks import TinyCNN
    from neurohybrid.disorders.stroke.families import N_FEATURES, _Case, residual_dead

    inputs, target = cohort["data"]["s1"]
    s = mech.settings(FAST)
    case = _Case(inputs, mech.calibrate(inputs, s), s, target)
    torch.manual_seed(0)
    net = TinyCNN(N_FEATURES, 1, 4, 3, zero_init=False)
    voxels = np.random.default_rng(0).choice(case.target.size, 40, replace=False)
    with torch.no_grad():
        full, pen_full = residual_dead(net, case, s, "cpu")
        sub, pen_sub = residual_dead(net, case, s, "cpu", voxels)
    torch.testing.assert_close(sub, full[torch.as_tensor(voxels)])
    assert float(pen_sub) == float(pen_full) > 0  # the penalty covers every candidate voxel
    # training items: disjoint seeded chunks of at most residual_train_voxels voxels per subject, outside the core
    from neurohybrid.disorders.stroke.families import voxel_items

    s40 = {**s, "residual_train_voxels": 40, "voxel_chunks": 4}
    items = voxel_items([case, case], s40, 0, 40)
    assert len(items) == 8 and case.target.size > 40
    for k in (0, 1):
        vox = np.concatenate([v for c, v in items if c == k])
        assert vox.size == 40 == np.unique(vox).size and not case.core[vox].any()
    again = voxel_items([case, case], s40, 0, 40)
    assert all(c == c2 and np.array_equal(v, v2) for (c, v), (c2, v2) in zip(items, again))


def test_per_subject_work_is_done_once_per_process(cohort, monkeypatch):
    """One forecast process runs every family on the same inputs: the calibration of sigma and the
    SOL families' fine reference solve are done once on the subject's shared work and reused."""
    from neurohybrid.disorders.stroke.families import SolCorrection

    calls = []
    real = mech._calibrate
    monkeypatch.setattr(mech, "_calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = cohort["data"]["s1"][0]
    inputs = SubjectData(base.subject, base.disorder, dict(base.arrays), dict(base.meta))  # a fresh context
    d = get_disorder("stroke")
    trained = {"state_dict": SolCorrection(mech.settings(FAST)["sol_hidden"]).state_dict()}
    fc = {f: d.family(f, FAST, "cpu").forecast(inputs, trained if f.startswith("sol") else None)
          for f in ("mechanistic", "sol", "sol_precomputed")}
    assert len(calls) == 1
    assert inputs.shared.computed["stroke.sol_fine_reference"] == 1
    assert fc["mechanistic"].parameters == fc["sol"].parameters == fc["sol_precomputed"].parameters
    assert fc["sol"].extra["fine_cost_seconds"] == fc["sol_precomputed"].extra["fine_cost_seconds"] > 0
    # the same data loaded again (another process) is calibrated afresh, to the same result
    again = mech.calibrate(SubjectData(base.subject, base.disorder, dict(base.arrays), dict(base.meta)),
                           mech.settings(FAST))
    assert len(calls) == 2 and again.parameters() == fc["mechanistic"].parameters


def test_training_process_shares_work_without_changing_results(cohort):
    """amortised and amortised_residual train the same parameter network; in one process (one
    TrainingPairs) the second reuses it. The checkpoints equal those of separate processes bit for bit."""
    from neurohybrid.disorders.base import TrainingPairs
    from neurohybrid.hybrid.device import seed_everything

    d = get_disorder("stroke")

    def run(pairs_of):
        out = {}
        for fam in ("amortised", "amortised_residual"):
            seed_everything(0)
            out[fam] = d.family(fam, FAST, "cpu").train(pairs_of())
        return out

    one = TrainingPairs([cohort["data"]["s1"], cohort["data"]["s2"]])
    shared = run(lambda: one)
    assert one.shared.computed["stroke.train_amortised"] == 1
    separate = run(lambda: TrainingPairs([cohort["data"]["s1"], cohort["data"]["s2"]]))
    for fam in shared:
        for part in ("state_dict", "amortised_state_dict"):
            for k, v in separate[fam][part].items():
                assert torch.equal(shared[fam][part][k], v), (fam, part, k)


def test_sol_and_precomputed_differ_only_in_targets(cohort):
    pairs = [cohort["data"]["s1"], cohort["data"]["s2"]]
    d = get_disorder("stroke")
    out = {}
    for unroll in (1, 3):
        cfg = {**FAST, "stroke": {**FAST["stroke"], "sol_steps": unroll}}
        for fam in ("sol", "sol_precomputed"):
            torch.manual_seed(0)
            out[fam, unroll] = d.family(fam, cfg, "cpu").train(pairs)["state_dict"]
    for k in out["sol", 1]:
        torch.testing.assert_close(out["sol", 1][k], out["sol_precomputed", 1][k])
    assert any(not torch.allclose(out["sol", 3][k], out["sol_precomputed", 3][k]) for k in out["sol", 3])


def test_cli_end_to_end(tmp_path):
    import yaml

    from neurohybrid.cli import main

    bids, preproc, _ = write_cohort(tmp_path, ["c1", "c2", "c3"])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(FAST))
    ins, tgs = str(tmp_path / "inputs"), str(tmp_path / "targets")
    for s in ("c1", "c2", "c3"):
        assert main(["inputs", "--disorder", "stroke", "--subject", s, "--bids", str(bids), "--preproc", str(preproc),
                     "--config", str(cfg), "--inputs-out", ins, "--targets-out", tgs]) == 0
    ckpt = tmp_path / "model-amortised.pt"
    assert main(["train", "--disorder", "stroke", "--family", "mechanistic,amortised", "--subjects", "c1,c2", "--inputs", ins,
                 "--targets", tgs, "--config", str(cfg), "--out-dir", str(ckpt.parent)]) == 0
    out = tmp_path / "forecasts"
    models = ["--models-dir", str(ckpt.parent)]
    for fam, extra in (("persistence", []), ("mechanistic", models), ("amortised", models)):
        assert main(["forecast", "--disorder", "stroke", "--family", fam, "--subject", "c3", "--inputs", ins,
                     "--config", str(cfg), "--out-dir", str(out), *extra]) == 0
        mask = nib.load(str(out / f"sub-c3_model-{fam}_desc-infarct_mask.nii.gz"))
        dead = nib.load(str(out / f"sub-c3_model-{fam}_desc-dead_probseg.nii.gz"))
        assert mask.shape == SHAPE and dead.shape == SHAPE
        fit = json.loads((out / f"sub-c3_model-{fam}_desc-fit.json").read_text())
        assert fit["model"] == fam
    assert json.loads((out / "sub-c3_model-mechanistic_desc-fit.json").read_text())["parameters"]["sensitivity"] > 0
    target = SubjectData.load(target_path(tgs, "c3"))
    assert set(target.arrays) == {"infarct"} and target.meta["hours_since_onset"] == 24.0
