"""Alzheimer's disorder: inputs, every family on a tiny synthetic cohort, zero-correction
equivalence, parameter recovery, and the inputs/train/forecast CLI end to end."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from alzheimer_synth import make_cohort, make_connectome, simulate_subject, write_subject  # noqa: E402

from neurohybrid.disorders.alzheimer import DISORDER  # noqa: E402
from neurohybrid.disorders.alzheimer.families import Mechanistic, Residual  # noqa: E402
from neurohybrid.disorders.alzheimer.model import Settings  # noqa: E402
from neurohybrid.disorders.base import FAMILIES  # noqa: E402
from neurohybrid.errors import InputError  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")
# tiny but real: few epochs/iterations, the same code paths as the demo
FAST = {"seed": 0, "models": {"epochs": 20, "hidden": 8}, "alzheimer": {"fit_iterations": 15, "restarts": 1,
                                                                         "lbfgs_iterations": 1, "sol_samples": 2}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("ad")
    bids, preproc, truth = make_cohort(root, n_subjects=4, n_regions=8, noise=0.02)
    data = {s: DISORDER.build_inputs(s, bids, preproc, FAST) for s in truth}
    return root, bids, preproc, truth, data


def test_build_inputs_holds_out_last_visit(cohort):
    _, bids, preproc, truth, data = cohort
    inputs, target = data["AD01"]
    assert inputs.arrays["suvr"].shape == (3, 8)  # brainstem (not in the connectome) dropped
    assert np.allclose(inputs.arrays["years"], [0, 1.5, 3.0])
    assert inputs.meta["target_years"] == 4.5 and target.meta["years"] == 4.5
    assert target.arrays["suvr"].shape == (8,)
    assert inputs.meta["regions"] == target.meta["regions"] and "brainstem" not in inputs.meta["regions"]
    pet = pd.read_csv(preproc / "sub-AD01" / "ses-04" / "pet" / "sub-AD01_ses-04_atlas-DK_desc-suvr_pet.tsv", sep="\t")
    assert np.allclose(target.arrays["suvr"], pet["suvr"].to_numpy()[:8])
    assert not any(np.allclose(target.arrays["suvr"], row) for row in inputs.arrays["suvr"])


def test_build_inputs_errors_name_subject_and_file(tmp_path):
    w, names = make_connectome(5)
    traj = simulate_subject(w, 0.1, 0.2, 0.5, years=[0.0, 1.0])
    write_subject(tmp_path / "bids", tmp_path / "pre", "X1", w, names, traj, years=[0.0, 1.0])
    with pytest.raises(InputError, match="at least 3"):
        DISORDER.build_inputs("X1", tmp_path / "bids", tmp_path / "pre", {})
    traj = simulate_subject(w, 0.1, 0.2, 0.5, years=[0.0, 1.0, 2.0])
    write_subject(tmp_path / "bids", tmp_path / "pre", "X2", w, names, traj, years=[0.0, 1.0, 2.0], extra_region=False)
    pet = tmp_path / "pre" / "sub-X2" / "ses-02" / "pet" / "sub-X2_ses-02_atlas-DK_desc-suvr_pet.tsv"
    pd.read_csv(pet, sep="\t").iloc[1:].to_csv(pet, sep="\t", index=False)
    with pytest.raises(InputError) as err:
        DISORDER.build_inputs("X2", tmp_path / "bids", tmp_path / "pre", {})
    assert "X2" in str(err.value) and "ses-02" in str(err.value) and "missing" in str(err.value)


def test_every_family_trains_and_forecasts(cohort):
    """Every family trains (its loss at least halves), forecasts finite SUVR in range and starts
    from the last observed visit."""
    _, _, _, _, data = cohort
    train = [data[s] for s in ("AD01", "AD02", "AD03")]
    inputs, target = data["AD04"]
    assert set(DISORDER.families) == set(FAMILIES)
    last_year = float(inputs.arrays["years"][-1])
    for name in FAMILIES:
        fam = DISORDER.family(name, FAST, CPU)
        ck = fam.train(train) if fam.trains_across_subjects else None
        if ck is not None:
            hist = ck["history"]
            # training converges, not just moves: at least half the first epoch's loss (sol_precomputed
            # learns its one-step targets within the first epoch's mini-batches: a third; issue 11)
            if name.startswith("sol"):
                # the SOL loss is the coarse solver's own error, small from the start at these steps: its
                # convergence is tested against the fine solver in test_alzheimer_sol.py; here the
                # validation over the horizon and the fall-back decision must be recorded
                val = ck["validation"]
                assert ck["use_correction"] == (val["corrected"] < val["coarse"]) and val["held_out"], name
            else:
                assert len(hist) >= 2 and min(hist) <= 0.5 * hist[0], f"{name}: loss did not fall enough {hist[:3]}..{min(hist)}"
            assert "val_history" in ck
        fc = fam.forecast(inputs, ck)
        out = fc.outputs["suvr"]
        # fair information: with (almost) no time to the held-out visit, the forecast is the last
        # observed visit, whatever the family fitted to the earlier ones
        near = fam.forecast(dataclasses.replace(inputs, meta={**inputs.meta, "target_years": last_year + 1e-6}), ck)
        assert np.allclose(near.outputs["suvr"], inputs.arrays["suvr"][-1], atol=1e-4), name
        assert out.shape == (8,) and np.all(np.isfinite(out)), name
        assert np.all(out > 0.5) and np.all(out < 4.0), name
        json.dumps(fc.parameters), json.dumps(fc.extra)  # the fit json must be writable
        if name in ("sol", "sol_precomputed"):
            for key in ("sol_error_vs_fine", "coarse_error_vs_fine", "fine_cost_seconds", "coarse_cost_seconds",
                        "sol_cost_seconds"):
                assert fc.extra[key] >= 0, (name, key)
            assert isinstance(fc.extra["use_correction"], bool) and fc.extra["sol_error_metric"]
            assert "sol_error" not in fc.extra and "coarse_error" not in fc.extra
    # the persistence forecast is the last observed visit
    assert np.array_equal(DISORDER.family("persistence", FAST, CPU).forecast(inputs, None).outputs["suvr"],
                          inputs.arrays["suvr"][-1])


def test_zero_correction_residual_equals_mechanistic(cohort):
    _, _, _, _, data = cohort
    train = [data[s] for s in ("AD01", "AD02", "AD03")]
    res_fam = Residual(FAST, CPU)
    ck = res_fam.train(train)
    ck["correction"] = {k: torch.zeros_like(v) for k, v in ck["correction"].items()}
    inputs = data["AD04"][0]
    a = res_fam.forecast(inputs, ck)
    b = Mechanistic(FAST, CPU).forecast(inputs, None)
    assert np.array_equal(a.outputs["suvr"], b.outputs["suvr"])
    assert a.parameters["kappa"] == b.parameters["kappa"] and a.parameters["alpha"] == b.parameters["alpha"]
    assert a.extra["correction_penalty"] == 0.0


def test_mechanistic_recovers_kappa_alpha_from_noiseless_data(tmp_path):
    w, names = make_connectome(8, seed=3)
    traj = simulate_subject(w, 0.12, 0.5, 0.8)
    write_subject(tmp_path / "bids", tmp_path / "pre", "R1", w, names, traj)
    inputs, target = DISORDER.build_inputs("R1", tmp_path / "bids", tmp_path / "pre", {})
    cfg = {"alzheimer": {"dt": 0.25, "fit_iterations": 60, "lbfgs_iterations": 20, "restarts": 1, "dtype": "float64"}}
    fc = Mechanistic(cfg, CPU).forecast(inputs, None)
    assert fc.parameters["kappa"] == pytest.approx(0.12, rel=0.02)
    assert fc.parameters["alpha"] == pytest.approx(0.5, rel=0.02)
    assert fc.parameters["suvr_amplitude"] == pytest.approx(2.0, rel=0.02)
    assert np.allclose(fc.outputs["suvr"], target.arrays["suvr"], atol=5e-3)
    assert all(np.isfinite(fc.parameters[k]) for k in ("kappa_sd", "alpha_sd"))


def test_settings_read_config_sections():
    s = Settings.from_config({"models": {"epochs": 7, "hidden": 5}, "alzheimer": {"epochs": 9, "sol_kappa_range": [0.1, 1]},
                              "sloppy": False})
    assert s.epochs == 9 and s.hidden == 5
    assert np.allclose(s.sol_bounds().lower, [0.1, s.sol_alpha_range[0], s.amplitude_bounds[0]])
    assert Settings.from_config({"alzheimer": {"sol_alpha_range": None}}).sol_bounds().lower[1] == s.alpha_bounds[0]
    assert Settings.from_config({"sloppy": True}).epochs <= 15
    with pytest.raises(InputError):
        Settings.from_config({"alzheimer": {"amortised_training": "magic"}})


def test_cli_inputs_train_forecast_end_to_end(cohort, tmp_path):
    import yaml

    from neurohybrid.cli import main

    _, bids, preproc, _, _ = cohort
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, "device": "cpu"}))
    res = tmp_path / "results"
    for s in ("AD01", "AD02", "AD03", "AD04"):
        assert main(["inputs", "--disorder", "alzheimer", "--subject", s, "--bids", str(bids), "--preproc", str(preproc),
                     "--config", str(cfg), "--inputs-out", str(res / "inputs"), "--targets-out", str(res / "targets")]) == 0
    model = res / "models" / "alzheimer" / "fold-0" / "model-residual.pt"
    assert main(["train", "--disorder", "alzheimer", "--family", "residual", "--subjects", "AD01,AD02,AD03",
                 "--inputs", str(res / "inputs"), "--targets", str(res / "targets"), "--config", str(cfg),
                 "--out-dir", str(model.parent)]) == 0
    out = res / "forecasts" / "sub-AD04"
    assert main(["forecast", "--disorder", "alzheimer", "--family", "residual", "--subject", "AD04",
                 "--inputs", str(res / "inputs"), "--models-dir", str(model.parent), "--config", str(cfg), "--out-dir", str(out)]) == 0
    tsv = pd.read_csv(out / "sub-AD04_model-residual_pet.tsv", sep="\t")
    assert list(tsv.columns) == ["region", "suvr"] and len(tsv) == 8 and np.all(np.isfinite(tsv["suvr"]))
    fit = json.loads((out / "sub-AD04_model-residual_desc-fit.json").read_text())
    assert fit["trained_on"] == ["AD01", "AD02", "AD03"] and "kappa" in fit["parameters"]
    # a model trained on the subject itself is refused (split guarantee)
    assert main(["forecast", "--disorder", "alzheimer", "--family", "residual", "--subject", "AD01",
                 "--inputs", str(res / "inputs"), "--models-dir", str(model.parent), "--config", str(cfg), "--out-dir", str(out)]) == 2
    assert main(["forecast", "--disorder", "alzheimer", "--family", "persistence", "--subject", "AD04",
                 "--inputs", str(res / "inputs"), "--config", str(cfg), "--out-dir", str(out)]) == 0


# ------------------------------------------------------------------------------------------
# fairness and hybrids that can see the missing physics (issue 10)

HYBRID = {"seed": 0, "models": {"epochs": 50, "patience": 15, "batch_size": 2},
          "alzheimer": {"fit_iterations": 100, "lbfgs_iterations": 10, "restarts": 2}}


def _rmse(fam, ck, data, subjects):
    return float(np.mean([np.sqrt(np.mean((fam.forecast(data[s][0], ck).outputs["suvr"] - data[s][1].arrays["suvr"]) ** 2))
                          for s in subjects]))


@pytest.mark.parametrize("clearance", [0.3, 0.0])
def test_residual_learns_position_dependent_clearance(clearance):
    """A regional clearance that depends on a region's position (frontal regions clear tau) is
    missing from the mechanistic model; the residual, which sees region positions, must beat the
    mechanistic forecast by >= 20% on held-out subjects, and not degrade a cohort without it by
    more than 5%."""
    from alzheimer_synth import hidden_cohort

    data = hidden_cohort(8, clearance, n_regions=10)
    subjects = list(data)
    train, test = subjects[:5], subjects[5:]
    mech = _rmse(Mechanistic(HYBRID, CPU), None, data, test)
    fam = Residual(HYBRID, CPU)
    ck = fam.train([data[s] for s in train])
    res = _rmse(fam, ck, data, test)
    assert len(ck["val_history"]) == len(ck["history"]) and ck["validation_subjects"]
    if clearance:
        assert res <= 0.8 * mech, (res, mech)
        assert min(ck["history"]) <= 0.5 * ck["history"][0], ck["history"]  # training converges, not just moves
    else:
        assert res <= 1.05 * mech, (res, mech)
