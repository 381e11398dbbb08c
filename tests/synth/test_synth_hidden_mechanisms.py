import numpy as np
import pytest
from scipy.integrate import solve_ivp

from neurohybrid.synth import alzheimer, glioma, stroke
from neurohybrid.synth.anatomy import make_subject_anatomy


@pytest.fixture(scope="module")
def anat():
    return make_subject_anatomy("test01", 4.0, np.random.default_rng(11))


@pytest.fixture(autouse=True)
def single_threaded_blas():
    # as in generate_subject: nested BLAS threads only slow these small solves down on a busy machine
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def test_glioma_hidden_proliferation_changes_growth(anat):
    hidden = glioma.simulate_subject(anat, np.random.default_rng(5), hidden=True)
    plain = glioma.simulate_subject(anat, np.random.default_rng(5), hidden=False)
    m = hidden["modulation"]
    assert m.min() >= -1 and m.max() <= 1 and m.max() > 0.9 and m.min() < -0.5
    # identical parameters and seed; only the hidden field differs
    assert hidden["params"]["seed_voxel"] == plain["params"]["seed_voxel"]
    theta = hidden["params"]["theta_flair"]
    growth_hidden = (hidden["states"][-1] >= theta).sum() - (hidden["states"][0] >= theta).sum()
    growth_plain = (plain["states"][-1] >= theta).sum() - (plain["states"][0] >= theta).sum()
    assert abs(growth_hidden - growth_plain) > 0.05 * max(growth_plain, 1)


def test_alzheimer_hidden_clearance_matches_independent_integration():
    params = alzheimer.draw_parameters(np.random.default_rng(2))
    u, names, gamma = alzheimer.simulate_tau(params, 4.0, hidden=True)
    lap, _, c = alzheimer.network_setup(4.0)
    u0 = np.zeros(len(names))
    u0[[names.index("L_entorhinal"), names.index("R_entorhinal")]] = params["seed_level"]
    k, a = params["kappa"], params["alpha"]
    rhs = lambda t, x: -k * lap @ x + a * x * (1 - x) - gamma * x  # noqa: E731
    t_eval = params["pre_years"] + np.asarray(params["visit_years"])
    ref = solve_ivp(rhs, (0, t_eval[-1]), u0, t_eval=t_eval, rtol=1e-10, atol=1e-12, method="DOP853").y.T
    np.testing.assert_allclose(u, ref, atol=1e-6)
    plain, _, _ = alzheimer.simulate_tau(params, 4.0, hidden=False)
    frontal = c > 0.8
    assert frontal.sum() >= 5 and np.all(gamma[frontal] > 0) and np.all(gamma[c == 0] == 0)
    # clearance lowers frontal tau measurably
    assert np.all(u[-1][frontal] < plain[-1][frontal])
    assert (plain[-1][frontal] - u[-1][frontal]).mean() > 0.05 * plain[-1][frontal].mean()


def test_stroke_plain_model_overpredicts_death(anat):
    params = stroke.draw_parameters(np.random.default_rng(4))
    params.update(onset_to_reperfusion_h=None, occlusion="M1", inflow_scale=0.3, collateral_strength=0.6)
    hidden = stroke.simulate_subject(anat, None, params=dict(params), hidden=True)
    plain = stroke.simulate_subject(anat, None, params=dict(params), hidden=False)
    territory = hidden["territory"]
    assert territory.sum() > 100
    cbf = hidden["cbf_normal"][anat.brain & (anat.gm > 0.8)]
    assert 40 < np.median(cbf) < 60  # GM ~56 at baseline
    assert np.median(hidden["cbf_onset"][territory]) < 0.5 * np.median(hidden["cbf_normal"][territory])
    assert np.all(hidden["cbf_imaging"] >= hidden["cbf_onset"] - 1e-9)  # collaterals only add flow
    final_hidden = (hidden["dead_followup"] > 0.8).sum()
    final_plain = (plain["dead_followup"] > 0.8).sum()
    assert final_plain > 1.1 * final_hidden > 0
    assert np.all(hidden["dead_followup"] >= hidden["dead_imaging"] - 1e-12)


def test_stroke_sensitivity_drawn_per_subject(anat):
    """Each virtual patient's tissue sensitivity sigma is drawn (seeded) from SENSITIVITY_RANGE and
    drives its tissue death: amortised inference has something to learn (it was 1.0 for everyone)."""
    sig = [stroke.draw_parameters(np.random.default_rng(k))["sensitivity"] for k in range(40)]
    lo, hi = stroke.SENSITIVITY_RANGE
    assert all(lo <= s <= hi for s in sig) and np.std(np.log(sig)) > 0.08
    assert stroke.draw_parameters(np.random.default_rng(3)) == stroke.draw_parameters(np.random.default_rng(3))
    params = stroke.draw_parameters(np.random.default_rng(4))
    params.update(onset_to_reperfusion_h=None, occlusion="M1", inflow_scale=0.3, collateral_strength=0.6)
    dead = {s: (stroke.simulate_subject(anat, None, params={**params, "sensitivity": s})["dead_followup"] > 0.8).sum()
            for s in (0.85, 1.2)}
    assert dead[1.2] > 1.1 * dead[0.85] > 0
