"""Glioma solver in the loop: the Numba stepper and torch twin of the coarse step, the gated
correction, SOL-n training on a small case, the fall-back, and the benchmark's schema."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurohybrid.disorders.glioma import mechanistic as mech
from neurohybrid.disorders.glioma.families import (N_SOL_COV, CoarseGliomaStep, _pool, _sol_covariates)
from neurohybrid.disorders.networks import GridCorrection
from neurohybrid.hybrid.solver_in_loop import CorrectedSolver, fit_correction, horizon_errors
from neurohybrid.solvers.glioma import (GliomaStepper, gaussian_seed, glioma_coefficients_torch, simulate_glioma,
                                        strang_advance_torch)

VOX = 4.0
SHAPE = (20, 20, 20)
S = dict(mech.DEFAULTS, sol_step_days=20.0, sol_coarse_max_rho_dt=1.0)


def tissue():
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    brain = (x / 9.0) ** 2 + (y / 9.0) ** 2 + (z / 8.5) ** 2 <= 1.0
    wm = np.where(brain, 0.5 + 0.4 * np.cos(x / 2.5) ** 2, 0.0).astype(np.float32)
    gm = np.where(brain, 1.0 - wm, 0.0).astype(np.float32)
    return wm, gm


def seed_state(wm, gm):
    u = gaussian_seed(SHAPE, (VOX,) * 3, (8.0, 10.0, 9.5), sigma_mm=6.0, amplitude=0.9).astype(np.float32)
    return u * ((wm + gm) > 0)


def test_stepper_equals_the_solver_and_the_twin():
    wm, gm = tissue()
    u0 = seed_state(wm, gm)
    kw = dict(spacing=(VOX,) * 3, dw=0.15, rho=0.05, max_rho_dt=0.2)
    stepper = GliomaStepper(wm, gm, u0, threads=1, **kw)
    ref = u0
    for h in (10.0, 7.5, 30.0):
        stepper.advance(h)
        ref = simulate_glioma(wm, gm, ref, days=h, threads=1, **kw)
        np.testing.assert_allclose(stepper.state, ref, atol=1e-6)
    # the batched torch twin: two members with different parameters and macro steps
    dws, rhos, hs = [0.15, 0.05], [0.05, 0.02], [12.0, 25.0]
    wm_t, gm_t = torch.tensor(wm), torch.tensor(gm)
    per = (2, 1, 1, 1)
    coeffs = glioma_coefficients_torch(wm_t, gm_t, (VOX,) * 3, torch.tensor(dws).reshape(per), 0.1)
    dts = []
    for dw, rho in zip(dws, rhos):
        dts.append(GliomaStepper(wm, gm, u0, spacing=(VOX,) * 3, dw=dw, rho=rho, max_rho_dt=0.2).dt)
    out = strang_advance_torch(torch.tensor(u0).expand(2, *SHAPE), coeffs, torch.tensor(hs).reshape(per),
                               torch.tensor(rhos).reshape(per), torch.tensor(dts).reshape(per))
    for m in range(2):
        ref = simulate_glioma(wm, gm, u0, spacing=(VOX,) * 3, dw=dws[m], rho=rhos[m], days=hs[m], max_rho_dt=0.2, threads=1)
        np.testing.assert_allclose(out[m].numpy(), ref, atol=2e-6)


def _random_correction(n_cov, seed=0):
    torch.manual_seed(seed)
    corr = GridCorrection(n_cov, 8, scale=1.0)
    for p in corr.parameters():
        torch.nn.init.normal_(p, std=1.0)
    return corr


def test_correction_is_zero_without_tumour_and_keeps_the_state_in_range():
    wm, gm = tissue()
    wm_c, gm_c = _pool(wm), _pool(gm)
    cov = torch.tensor(_sol_covariates(wm_c, gm_c, 0.1, 0.05, 20.0, S))
    model = CorrectedSolver(CoarseGliomaStep((VOX,) * 3, S), _random_correction(N_SOL_COV))
    model.correction.set_shape(wm_c.shape)
    u = torch.tensor(_pool(seed_state(wm, gm)))[None]
    u[0, :3] = 0.0  # a slab without tumour
    u[0, -3:] = 1.0  # and a saturated one
    model.set_context(cov)
    with torch.no_grad():
        out = model.correct(u, cov)
        steps = model.rollout(u, 3)
    assert torch.equal(out[0, :3], u[0, :3]) and torch.equal(out[0, -3:], u[0, -3:])
    tissue_c = torch.tensor((wm_c + gm_c) > 0)
    assert torch.equal(out[0][~tissue_c], u[0][~tissue_c])
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - u).abs().max()) > 1e-3  # the random correction does act on the tumour
    # gated: the change is at most 4 u (1 - u) |h(u)| (vanishes as u -> 0 or 1, not only off the front)
    from neurohybrid.hybrid.solver_in_loop import logistic_gate

    with torch.no_grad():
        bound = logistic_gate(u) * model.correction(u, cov).abs()
    assert bool(((out - u).abs() <= bound + 1e-6).all())
    assert float(steps.min()) >= 0.0 and float(steps.max()) <= 1.0


def _trajectories(draws, k, h):
    """Fine (model-grid) trajectories pooled onto the coarse grid, and their covariates."""
    wm, gm = tissue()
    u0 = seed_state(wm, gm)
    wm_c, gm_c = _pool(wm), _pool(gm)
    fine, cov = [], []
    for dw, rho in draws:
        states = simulate_glioma(wm, gm, u0, spacing=(VOX,) * 3, dw=dw, rho=rho, days=h * k,
                                 save_days=[h * (j + 1) for j in range(k)], max_rho_dt=0.2, threads=1)
        fine.append(np.stack([_pool(u0)] + [_pool(u) for u in states]))
        cov.append(_sol_covariates(wm_c, gm_c, dw, rho, h, S)[0])
    return torch.tensor(np.stack(fine)), torch.tensor(np.stack(cov)), wm_c.shape


DRAWS = [(0.04, 0.08), (0.2, 0.02), (0.08, 0.05), (0.12, 0.03), (0.05, 0.12), (0.25, 0.015), (0.07, 0.07), (0.1, 0.04)]
HELD_OUT = [(0.06, 0.06), (0.15, 0.025)]


def _model(shape):
    model = CorrectedSolver(CoarseGliomaStep((VOX,) * 3, S), GridCorrection(N_SOL_COV, 16, scale=0.1))
    model.correction.set_shape(shape)
    return model


@pytest.mark.parametrize("precomputed", [False])
def test_sol_training_halves_the_error_on_held_out_draws(precomputed):
    torch.manual_seed(0)
    fine, cov, shape = _trajectories(DRAWS, 4, 20.0)
    model = _model(shape)
    ckpt = fit_correction(model, fine, cov, precomputed=precomputed, n_unroll=3, epochs=40, lr=1e-2, batch_size=4,
                          val_fraction=0.25, seed=0)
    held_fine, held_cov, _ = _trajectories(HELD_OUT, 4, 20.0)
    err = horizon_errors(model, held_fine, held_cov)
    assert ckpt["use_correction"] and err["corrected"] <= 0.5 * err["coarse"], (err, ckpt["validation"])


def test_fall_back_to_the_coarse_solver_is_recorded():
    """Targets that ARE the coarse solver's own trajectories: nothing to correct, so the trained
    correction cannot beat the plain coarse solver on validation and is switched off."""
    fine, cov, shape = _trajectories(DRAWS[:4], 3, 20.0)
    model = _model(shape)
    model.use_correction = False
    model.set_context(cov)
    with torch.no_grad():
        coarse = torch.cat([fine[:, :1], model.rollout(fine[:, 0], 3)], 1)
    model.use_correction = True
    ckpt = fit_correction(model, coarse, cov, precomputed=False, n_unroll=2, epochs=3, lr=1e-2, batch_size=2,
                          val_fraction=0.5, seed=0)
    assert ckpt["use_correction"] is False and model.use_correction is False
    assert ckpt["validation"]["corrected"] >= ckpt["validation"]["coarse"]


def test_bench_quick_returns_the_schema():
    from neurohybrid.disorders.glioma import sol_bench

    out = sol_bench.run(quick=True)
    assert out["disorder"] == "glioma" and out["error_metric"] and out["tolerance"] and out["coarse_setup"]
    assert set(out["train_seconds"]) == {"sol", "sol_precomputed"}
    for case in out["cases"]:
        for key in ("case", "fine_s", "coarse_s", "sol_s", "sol_precomputed_s", "coarse_error", "sol_error",
                    "sol_precomputed_error", "sol_dice_t1gd", "sol_dice_flair", "coarse_dice_t1gd"):
            assert key in case
        assert case["case"].startswith("solbench1")  # held-out subjects, not the training ones
    for key in ("fine_s", "sol_s", "coarse_error", "sol_error", "speedup_vs_fine", "speedup_equal_accuracy"):
        assert key in out["summary"]
    assert set(out["grids"]) == {"4mm"} and set(out["bar"]["4mm"]) == {"speedup_vs_fine", "all_cases_meet_dice", "meets_bar"}


def _random_checkpoint(family, std=0.3):
    torch.manual_seed(1)
    corr, up = family.model((VOX,) * 3).correction, family.upsampler()
    for net in (corr, up):
        for p in net.parameters():
            torch.nn.init.normal_(p, std=std)
    return {"state_dict": corr.state_dict(), "use_correction": True,
            "upsampler": {"state_dict": up.state_dict(), "use_learned": True}}


def test_numba_forecast_equals_the_torch_modules():
    """The forecast's Numba path (pooling, coarse steps, gated correction, interpolation and learned
    upsampling with the trained weights) reproduces the torch modules the networks are trained as."""
    from neurohybrid.disorders.base import get_disorder
    from neurohybrid.disorders.glioma.families import SolForecaster

    fam = get_disorder("glioma").family("sol", {"seed": 0, "sloppy": True, "glioma": {"threads": 1, "sol_step_days": 20.0}},
                                        torch.device("cpu"))
    wm, gm = tissue()
    u0 = seed_state(wm, gm)
    runner = SolForecaster(fam, dict(wm=wm, gm=gm), (VOX,) * 3, 0.1, 0.05, 70.0, _random_checkpoint(fam))
    assert runner.n_macro == 4
    sol, sol_t = runner.sol(u0), runner.sol_torch(u0)
    coarse, coarse_t = runner.coarse(u0), runner.coarse_torch(u0)
    assert float(np.abs(sol - coarse).max()) > 1e-2  # the random corrections do act
    np.testing.assert_allclose(sol, sol_t, atol=2e-5)
    np.testing.assert_allclose(coarse, coarse_t, atol=2e-6)
    np.testing.assert_allclose(runner.fine(u0), runner.fine_simulate(u0), atol=1e-6)
    again = runner.sol(u0)  # scratch buffers are reset between calls
    np.testing.assert_array_equal(again, sol)
