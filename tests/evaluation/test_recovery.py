"""Parameter recovery scores only fitted, identifiable parameters in the generator's own units."""

import math

import numpy as np
import pytest

from neurohybrid.evaluation.recovery import RECOVERABLE, recovered, recovery_scores


def test_glioma_thresholds_and_settings_are_not_scored():
    fit = {"parameters": {"dw": 0.3, "rho": 0.02, "t0_days": 300.0, "theta_t1gd": 0.7, "theta_flair": 0.25,
                          "seed_voxel": [4.0, 5.0, 6.0], "calibration_loss": 0.1, "dw_log_sd": 0.2}}
    truth = {"disease": {"dw": 0.2, "rho": 0.025, "dg_ratio": 0.1, "theta_t1gd": 0.6, "theta_flair": 0.2},
             "anatomy": {"seed": 3}, "voxel_mm": 2.0}
    values, reasons = recovery_scores("glioma", fit, truth)
    assert set(values) == {"param_abs_error_dw", "param_rel_error_dw", "param_abs_error_rho", "param_rel_error_rho"}
    assert values["param_rel_error_dw"] == pytest.approx(0.5) and values["param_rel_error_rho"] == pytest.approx(0.2)
    assert reasons == {}


def test_stroke_sigma_from_a_prior_is_counted_missing_with_its_reason():
    truth = {"disease": {"sensitivity": 1.2, "collateral_strength": 0.5, "inflow_scale": 0.3}}
    prior = {"parameters": {"sensitivity": 1.0, "sensitivity_interval": [0.8, 1.2]},
             "sigma_identified": False, "sigma_source": "fold prior"}
    values, reasons = recovery_scores("stroke", prior, truth)
    assert set(values) == {"param_abs_error_sensitivity", "param_rel_error_sensitivity"}
    assert all(math.isnan(v) for v in values.values())
    assert reasons["param_rel_error_sensitivity"] == "sigma not identified by the acute core (taken from the fold prior)"
    fitted = {**prior, "sigma_identified": True, "sigma_source": "acute core"}
    values, reasons = recovery_scores("stroke", fitted, truth)
    assert values["param_abs_error_sensitivity"] == pytest.approx(0.2) and reasons == {}


@pytest.mark.parametrize("source, scored", [("normative", True), ("dwi-dipy", False), ("normative-csv", False), (None, False)])
def test_alzheimer_kappa_only_on_the_generators_connectome(source, scored):
    fit = {"parameters": {"kappa": 0.4, "alpha": 0.3, "suvr_amplitude": 1.5, "kappa_sd": 0.1}}
    truth = {"disease": {"kappa": 0.5, "alpha": 0.3, "suvr_amplitude": 1.6, "seed_level": 0.05, "regions": ["a"]}}
    meta = {"regions": ["a"]} if source is None else {"regions": ["a"], "connectome_source": source}
    values, reasons = recovery_scores("alzheimer", fit, truth, meta)
    assert values["param_rel_error_alpha"] == 0.0 and values["param_abs_error_suvr_amplitude"] == pytest.approx(0.1)
    assert set(values) == {f"param_{k}_error_{p}" for k in ("abs", "rel") for p in ("kappa", "alpha", "suvr_amplitude")}
    if scored:
        assert values["param_rel_error_kappa"] == pytest.approx(0.2) and reasons == {}
    else:
        assert math.isnan(values["param_rel_error_kappa"]) and "kappa" in reasons["param_rel_error_kappa"]
        assert set(reasons) == {"param_abs_error_kappa", "param_rel_error_kappa"}


def test_truth_found_by_unique_leaf_and_absent_truth_is_no_row():
    # a truth file without the 'disease' level (hand-made cohorts): the unique leaf is used
    assert recovered("glioma", {"parameters": {"dw": 0.1}}, {"dw": 0.2}) == {"dw": (0.1, 0.2, "")}
    # nothing to compare with: no row, not a missing value (a real cohort has no truth)
    assert recovery_scores("glioma", {"parameters": {"dw": 0.1}}, {}) == ({}, {})


def test_alzheimer_alpha_is_the_generators_alpha():
    """The reason alpha is scored as it is: the generator evolves tau with -kappa L tau + alpha tau (1 - tau)
    and observes SUVR = 1 + A tau; the model's right-hand side in SUVR, with baseline 1 and amplitude A,
    is exactly A times the generator's, with the same kappa and alpha."""
    import torch

    from neurohybrid.disorders.alzheimer.model import mechanistic_rhs
    from neurohybrid.solvers.network import laplacian

    rng = np.random.default_rng(0)
    w = rng.random((6, 6))
    lap = laplacian(w + w.T)
    kappa, alpha, amp = 0.4, 0.3, 1.7
    tau = rng.uniform(0.0, 0.9, size=6)
    generator = -kappa * lap @ tau + alpha * tau * (1.0 - tau)
    f = mechanistic_rhs(torch.tensor([[kappa, alpha, amp]], dtype=torch.float64),
                        torch.ones((1, 6), dtype=torch.float64), torch.tensor(lap)[None])
    model = f(torch.tensor(1.0 + amp * tau)[None]).numpy()[0]
    assert np.allclose(model, amp * generator, atol=1e-12)
    assert "alpha" in [r.name for r in RECOVERABLE["alzheimer"]]


def test_glioma_model_and_generator_share_the_grey_white_ratio():
    """dw means the same diffusivity only if D = dw (P_wm + dg_ratio P_gm) with the same ratio."""
    from neurohybrid.disorders.glioma.mechanistic import DEFAULTS
    from neurohybrid.synth.glioma import draw_parameters

    assert DEFAULTS["dg_ratio"] == draw_parameters(np.random.default_rng(0))["dg_ratio"]
