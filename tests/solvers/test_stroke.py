"""Xue 2021 tissue-death model, its penumbra variant and torch twin."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from neurohybrid.errors import InputError
from neurohybrid.solvers.stroke import (
    XUE2021,
    hypoxic_fraction,
    normal_cbf,
    simulate_penumbra,
    simulate_tissue_death,
    simulate_tissue_death_torch,
    time_grid,
)

P = XUE2021


def test_hypoxic_fraction_formula():
    f = np.array([0.0, 18.88, 40.0, 56.0])
    expected = 1.0 - 1.0 / (1.0 + np.exp(-2.0 * (P["k1"] * f + P["k2"])))
    assert np.allclose(hypoxic_fraction(f), expected, rtol=1e-13, atol=1e-15)
    assert abs(hypoxic_fraction(-P["k2"] / P["k1"]) - 0.5) < 1e-12  # H = 0.5 at F ~ 18.9
    # WM perfusion is multiplied by 2.6998 before H
    assert np.isclose(hypoxic_fraction(10.0, wm_fraction=1.0), hypoxic_fraction(10.0 * 2.6998))
    assert np.isclose(hypoxic_fraction(10.0, wm_fraction=0.5), hypoxic_fraction(10.0 * (1 + 0.5 * 1.6998)))


def _reference(cbf, wm, hours, reperfusion_h):
    """solve_ivp on the two phases, rates per second."""
    def f(_t, y, hyp):
        d, tox = y
        return [P["kf"] * tox * (1 - d), (P["kt"] * hyp - P["kb"] * tox * (1 - hyp)) * (1 - d)]

    h0 = float(hypoxic_fraction(cbf, wm))
    h1 = float(hypoxic_fraction(normal_cbf(wm), wm))
    kw = dict(method="DOP853", rtol=1e-11, atol=1e-13)
    a = solve_ivp(f, (0, reperfusion_h * 3600), [0.0, 0.0], args=(h0,), **kw)
    b = solve_ivp(f, (reperfusion_h * 3600, hours * 3600), a.y[:, -1], args=(h1,), **kw)
    return b.y[:, -1]


def test_matches_solve_ivp_with_reperfusion():
    cbf = np.array([0.0, 8.0, 16.0, 20.0, 25.0, 10.0])
    wm = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    res = simulate_tissue_death(cbf, hours=24.0, reperfusion_h=2.5, wm_fraction=wm)
    for v in range(cbf.size):
        d_ref, t_ref = _reference(cbf[v], wm[v], 24.0, 2.5)
        assert abs(res["dead"][v] - d_ref) < 1e-6
        assert abs(res["toxic"][v] - t_ref) < 1e-6 * max(1.0, abs(t_ref))
    # intermediate deaths are neither 0 nor 1: the comparison is informative
    assert 0.05 < res["dead"][3] < 0.95


@pytest.mark.parametrize("dt_s, tol", [(900.0, 5e-6), (300.0, 5e-8)])
def test_model_time_steps_are_accurate(dt_s, tol):
    """The stroke families' steps (disorders.stroke.mechanistic: dt_s 900 s for the model, fine_dt_s
    300 s for the SOL reference) against solve_ivp over 120 h with reperfusion, from no flow (the
    stiffest voxel: H ~ 1) to the penumbra, grey and white matter."""
    cbf = np.array([0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 25.0, 35.0, 10.0])
    wm = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    res = simulate_tissue_death(cbf, hours=120.0, reperfusion_h=7.85, wm_fraction=wm, dt_s=dt_s)
    ref = np.array([_reference(cbf[v], wm[v], 120.0, 7.85)[0] for v in range(cbf.size)])
    assert np.abs(res["dead"] - ref).max() < tol
    assert ((res["dead"] > 0.8) == (ref > 0.8)).all()
    assert ((ref > 0.05) & (ref < 0.95)).sum() >= 3  # partial deaths: the comparison is informative


def test_dead_fraction_never_decreases_and_stays_in_unit_interval():
    cbf = np.linspace(0, 60, 25)
    save = np.linspace(0, 48, 49)
    res = simulate_tissue_death(cbf, hours=48.0, reperfusion_h=6.0, save_hours=save)
    dead = res["dead"]
    assert dead.shape == (49, 25)
    assert np.all(np.diff(dead, axis=0) >= -1e-15)
    assert dead.min() >= 0 and dead.max() <= 1 + 1e-12
    assert np.all(dead[0] == 0)


def test_no_death_at_normal_perfusion():
    res = simulate_tissue_death(np.array([56.0, 21.0]), hours=120.0, wm_fraction=np.array([0.0, 1.0]))
    assert res["dead"].max() < 1e-3
    # and severe ischaemia without reperfusion kills within hours
    res = simulate_tissue_death(np.array([0.0, 5.0]), hours=6.0)
    assert res["dead"].min() > 0.8


def test_earlier_reperfusion_less_death():
    cbf = np.array([5.0, 12.0, 17.0])
    dead = [simulate_tissue_death(cbf, hours=72.0, reperfusion_h=r)["dead"] for r in (0.5, 1.0, 2.0, 3.0)]
    for early, late in zip(dead[:-1], dead[1:]):
        assert np.all(early <= late)
        assert early.sum() < late.sum() - 1e-3  # the penumbral voxels gain strictly
    never = simulate_tissue_death(cbf, hours=72.0)["dead"]
    assert np.all(dead[-1] <= never) and dead[-1].sum() < never.sum() - 1e-3


def test_save_hours_consistent_with_single_runs():
    cbf = np.array([3.0, 14.0, 30.0])
    series = simulate_tissue_death(cbf, hours=10.0, reperfusion_h=4.0, save_hours=[2.0, 4.0, 10.0])
    for i, h in enumerate((2.0, 4.0, 10.0)):
        single = simulate_tissue_death(cbf, hours=h, reperfusion_h=4.0 if h > 4.0 else None)
        assert np.abs(series["dead"][i] - single["dead"]).max() < 1e-12


def test_time_grid_lands_on_reperfusion():
    ends, phases, steps, save_seg = time_grid(5.0, reperfusion_h=1.25, save_hours=[0.5, 5.0], dt_s=600.0)
    assert ends.tolist() == [1800.0, 4500.0, 18000.0]
    assert phases.tolist() == [0, 0, 1]
    assert steps.tolist() == [3, 5, 23]
    assert save_seg.tolist() == [0, 2]


@pytest.mark.parametrize("rep", [2.2, 4.07, 4.597134453694828, 1.25])
def test_time_grid_reperfuses_whatever_the_rounding(rep):
    """Reperfusion times whose seconds round down (e.g. 2.2 h) once left the
    segment after reperfusion in phase 0: the tissue stayed ischaemic until the next save time."""
    _, phases, _, _ = time_grid(120.0, reperfusion_h=rep, dt_s=300.0)
    assert phases.tolist() == [0, 1]
    _, phases, _, _ = time_grid(120.0, reperfusion_h=rep, save_hours=[10.0, 120.0], dt_s=300.0)
    assert phases.tolist() == [0, 1, 1]
    cbf = np.array([22.0])
    after = simulate_tissue_death(cbf, hours=24.0, reperfusion_h=rep, save_hours=[rep, 24.0], dt_s=300.0)
    assert after["dead"][0, 0] < 0.5 and after["toxic"][1, 0] < 1e-3 * after["toxic"][0, 0]  # washed out


def test_bad_inputs():
    with pytest.raises(InputError, match="NaN"):
        simulate_tissue_death(np.array([np.nan]), hours=1.0)
    with pytest.raises(InputError, match=">= 0"):
        simulate_tissue_death(np.array([-1.0]), hours=1.0)
    with pytest.raises(InputError, match="positive"):
        simulate_tissue_death(np.array([10.0]), hours=0.0)
    with pytest.raises(InputError, match="wm_fraction"):
        simulate_tissue_death(np.array([10.0]), hours=1.0, wm_fraction=1.5)


def _lesion(shape=(8, 7, 6)):
    cbf = np.full(shape, 56.0)
    cbf[2:5, 2:5, 2:4] = 4.0
    cbf[5, 2:5, 2:4] = 14.0
    return cbf


def test_penumbra_with_zero_diffusion_is_local_model():
    cbf = _lesion()
    a = simulate_penumbra(cbf, hours=12.0, reperfusion_h=3.0, toxic_diffusivity=0.0, save_hours=[3.0, 12.0])
    b = simulate_tissue_death(cbf, hours=12.0, reperfusion_h=3.0, save_hours=[3.0, 12.0])
    assert np.abs(a["dead"] - b["dead"]).max() < 1e-13
    assert np.abs(a["toxic"] - b["toxic"]).max() < 1e-13


def test_penumbra_spreads_toxicity_and_conserves_it_without_kinetics():
    cbf = _lesion()
    local = simulate_tissue_death(cbf, hours=12.0)
    spread = simulate_penumbra(cbf, hours=12.0, toxic_diffusivity=5e-4, spacing=(1.0, 1.0, 1.0))
    rim = (slice(1, 2), slice(2, 5), slice(2, 4))  # healthy tissue next to the core
    assert np.all(spread["dead"][rim] > 10 * local["dead"][rim])
    assert np.all(spread["dead"][rim] > 1e-3)
    # symmetric lesion in a symmetric grid stays symmetric (x-axis mirror of a centred block)
    sym = np.full((7, 5, 5), 56.0)
    sym[2:5, 1:4, 1:4] = 4.0
    out = simulate_penumbra(sym, hours=6.0, toxic_diffusivity=5e-4)["dead"]
    assert np.abs(out - out[::-1]).max() < 1e-12
    # with the kinetics switched off, diffusion only moves T around: total T is conserved
    params = dict(P, kt=0.0, kb=0.0, kf=0.0)
    mask = np.ones(sym.shape, bool)
    mask[0] = False
    # initial T from a first phase with kinetics, then pure diffusion must keep sum(T)
    from neurohybrid.solvers import stroke

    h = hypoxic_fraction(sym)
    ends, phases, steps, _ = time_grid(2.0, None, [1.0, 2.0], 30.0)
    tox0 = np.where(mask, sym < 10, 0.0).astype(float)
    seg_d, seg_t = stroke._penumbra_integrate(h, h, mask, np.array([5e-4] * 3), ends, phases, steps,
                                              params["kf"], params["kt"], params["kb"], np.zeros(sym.shape), tox0)
    assert abs(seg_t[-1].sum() - tox0.sum()) < 1e-10 * tox0.sum()
    assert seg_t[-1].max() < 1.0  # and it did spread
    assert np.all(seg_t[-1][~mask] == 0)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-4)])
def test_torch_twin_equals_numba(dtype, tol):
    torch = pytest.importorskip("torch")
    cbf = np.array([0.0, 6.0, 13.0, 19.0, 30.0, 56.0])
    wm = np.array([0.0, 0.3, 0.0, 1.0, 0.0, 0.0])
    ref = simulate_tissue_death(cbf, hours=8.0, reperfusion_h=2.0, wm_fraction=wm, save_hours=[2.0, 8.0], dt_s=240.0)
    got = simulate_tissue_death_torch(torch.tensor(cbf, dtype=getattr(torch, dtype)), hours=8.0, reperfusion_h=2.0,
                                      wm_fraction=wm, save_hours=[2.0, 8.0], dt_s=240.0)
    assert got["dead"].shape == (2, 6)
    assert np.abs(got["dead"].double().numpy() - ref["dead"]).max() < tol


def test_torch_twin_gradients():
    torch = pytest.importorskip("torch")
    cbf = torch.tensor([10.0, 15.0], dtype=torch.float64, requires_grad=True)

    def fn(f):
        return simulate_tissue_death_torch(f, hours=2.0, reperfusion_h=1.0, dt_s=600.0)["dead"]

    assert torch.autograd.gradcheck(fn, (cbf,), eps=1e-4, atol=1e-7)
    # more flow, less death
    fn(cbf).sum().backward()
    assert torch.all(cbf.grad < 0)
