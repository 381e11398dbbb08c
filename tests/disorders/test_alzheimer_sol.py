"""Alzheimer's solver-in-the-loop (issue 11): the semi-implicit coarse step, the excess-gated and
clamped correction, SOL-n training against the fine solver on held-out draws, the fall-back, and
the benchmark's schema."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from alzheimer_synth import hidden_cohort  # noqa: E402

from neurohybrid.disorders.alzheimer.families import (  # noqa: E402
    SolverInTheLoop, _sol_covariates, _sol_model, sol_loss_weights, sol_training_set, spectral_laplacian,
)
from neurohybrid.disorders.alzheimer.model import Settings, Subject  # noqa: E402
from neurohybrid.hybrid.solver_in_loop import fit_correction, horizon_errors  # noqa: E402

torch.set_num_threads(1)
F64 = torch.float64


def _laplacian(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=g, dtype=F64)
    w = torch.triu(w, 1)
    w = w + w.T
    lap = torch.diag(w.sum(1)) - w
    return (lap / w.max())[None]


def _model_and_covariates(u, theta, h, seed=0, scale=1.0):
    s = Settings(dtype="float64")
    model = _sol_model(s, None, F64)
    torch.manual_seed(seed)
    for p in model.correction.parameters():  # an arbitrary (large) correction
        torch.nn.init.normal_(p, std=scale)
    base = torch.ones_like(u)
    cov = _sol_covariates(torch.as_tensor([theta], dtype=F64), torch.as_tensor([h], dtype=F64), base, u,
                          spectral_laplacian(_laplacian(u.shape[-1])))
    return model.set_context(cov), cov


def test_correction_zero_without_excess_and_state_in_invariant_range():
    u = torch.tensor([[1.0, 1.0, 0.95, 1.6, 2.2, 1.0, 1.3, 0.9, 1.0, 1.05]], dtype=F64)  # b = 1, A = 1.5
    model, cov = _model_and_covariates(u, (0.8, 0.9, 1.5), 1.5, scale=3.0)
    corrected = model.correct(u)
    no_excess = u <= 1.0
    assert torch.equal(corrected[no_excess], u[no_excess])  # exactly zero where there is no excess
    assert not torch.allclose(corrected, u)  # and not zero elsewhere
    lower, upper = 1.0 + min(0.0, float((u - 1).min())), 1.0 + max(1.5, float((u - 1).max()))
    for _ in range(5):  # the corrected state stays in the model's invariant range
        u_next = model.step(u).detach()
        assert float(u_next.min()) >= lower - 1e-12 and float(u_next.max()) <= upper + 1e-12
        u = u_next


def test_coarse_step_is_stable_far_beyond_forward_eulers_limit():
    """h kappa rho(L) > 5 (forward Euler needs < 2): the semi-implicit step keeps the excess in
    [0, A] and moves towards the fine solution (closer than the start state), where forward Euler
    leaves the valid range."""
    from neurohybrid.solvers.network import simulate_network

    u = torch.ones(1, 10, dtype=F64)
    u[0, :2] += 1.2
    model, cov = _model_and_covariates(u, (1.0, 0.5, 1.5), 3.0)
    model.use_correction = False
    lap = _laplacian(10)[0]
    rho = float(torch.linalg.eigvalsh(lap).max())
    assert 3.0 * 1.0 * rho > 5.0
    out = model.step(u)
    assert float(out.min()) >= 1.0 and float(out.max()) <= 2.5
    fine = simulate_network(lap.numpy(), u.numpy(), [3.0], kappa=1.0, alpha=0.5 / 1.5, model="local",
                            baseline=np.ones(10), capacity=np.full(10, 2.5))[0, -1]
    assert np.sqrt(np.mean((out.numpy()[0] - fine) ** 2)) < 0.7 * np.sqrt(np.mean((u.numpy()[0] - fine) ** 2))
    euler = u - 3.0 * 1.0 * (u - 1.0) @ lap.T
    assert float(euler.min()) < 0.0  # what the explicit step would do


def test_correction_is_second_order_in_the_step():
    """The correction of an arbitrary network vanishes like h^2 as the step shrinks (the coarse
    step's local error is O(h^2)): a step 10 times shorter gets a correction ~100 times smaller
    (more than 50: not first order)."""
    u = torch.tensor([[1.0, 1.4, 1.7, 1.2, 1.05, 1.0, 1.3, 1.1, 1.0, 1.5]], dtype=F64)
    sizes = []
    for h in (1.5e-2, 1.5e-3):
        model, cov = _model_and_covariates(u, (0.8, 0.9, 1.5), h, scale=1.0)
        sizes.append(float((model.correct(u) - u).detach().abs().max()))
    assert sizes[0] > 1e-7 and sizes[1] < sizes[0] / 50.0, sizes


def test_loss_weights_equalise_the_trajectories():
    """Relative loss weights: a trajectory whose coarse error is 10 times larger weighs ~100 times
    less (power 2), the mean weight is 1, and power 0 is the plain mean squared error."""
    data = hidden_cohort(2, 0.0, n_regions=10)
    subjects = [Subject.from_inputs(*data[s]) for s in data]
    s = Settings(sol_samples=4, dtype="float64")
    fine, cov = sol_training_set(subjects, s, 0, None, F64)
    model = _sol_model(s, None, F64).set_context(cov)
    assert sol_loss_weights(model, fine, cov, 0) is None
    w = sol_loss_weights(model, fine, cov, 2)
    assert w.shape == (fine.shape[0],) and abs(float(w.mean()) - 1.0) < 1e-9
    from neurohybrid.hybrid.solver_in_loop import precomputed_pairs

    inputs, targets = precomputed_pairs(model, fine, cov)
    err2 = ((inputs - targets) ** 2).reshape(fine.shape[0], -1).mean(dim=1)
    weighted = w * (err2 + 1e-8)
    assert float(weighted.max() / weighted.min()) < 1.0 + 1e-9  # every trajectory's coarse error counts alike
    assert float(err2.max() / err2.min()) > 100.0  # while the errors themselves span orders of magnitude
    from neurohybrid.hybrid.solver_in_loop import precomputed_loss

    model.use_correction = False  # the weighted loss of the plain coarse step is the weighted mean of err2
    loss = precomputed_loss(model, inputs, targets, cov, w)
    assert abs(float(loss) - float((w * err2).sum() / w.sum())) < 1e-12 * max(float(loss), 1.0)
    assert abs(float(loss) - float(err2.mean())) > 1e-3 * float(err2.mean())


def _small_case(epochs, precomputed=False, **kw):
    data = hidden_cohort(3, 0.0, n_regions=10)
    subjects = [Subject.from_inputs(*data[s]) for s in data]
    s = Settings(sol_kappa_range=(0.3, 1.0), sol_alpha_range=(0.3, 1.0), epochs=epochs, sol_steps=2,
                 sol_trajectory_steps=2, sol_samples=16, sol_batch_size=16, patience=None, val_fraction=0.2, **kw)
    fine, cov = sol_training_set(subjects[:1], s, 0, None, torch.float32)
    torch.manual_seed(0)
    model = _sol_model(s, None, torch.float32).set_context(cov)
    ck = fit_correction(model, fine, cov, precomputed=precomputed, n_unroll=s.sol_steps,
                        **dict(s.train_kw(), batch_size=s.sol_batch_size))
    other_fine, other_cov = sol_training_set(subjects[1:], s, 1, None, torch.float32)
    return ck, model, horizon_errors(model, other_fine, other_cov)


def test_sol_training_halves_the_error_against_the_fine_solver():
    """SOL-2 on one small subject (10 regions, stiff part of the prior: kappa 0.3-1, alpha 0.3-1):
    over the horizon of held-out parameter draws the corrected coarse solver's error against the
    fine solver is at most half the plain coarse one's; on other subjects' draws it is lower too."""
    ck, model, other = _small_case(120)
    val = ck["validation"]
    assert val["held_out"] and ck["use_correction"]
    assert val["corrected"] <= 0.5 * val["coarse"], val
    assert other["corrected"] < 0.75 * other["coarse"], other


def test_fall_back_to_the_coarse_solver_is_recorded():
    """A correction that is worse than the coarse solver on validation is switched off, and the
    forecast records it (the SOL forecast is then the plain coarse solver's)."""
    ck, model, _ = _small_case(1, learning_rate=30.0)
    assert ck["validation"]["corrected"] >= ck["validation"]["coarse"]
    assert ck["use_correction"] is False and model.use_correction is False
    data = hidden_cohort(2, 0.0, n_regions=8, seed=3)
    fam = SolverInTheLoop({"alzheimer": {"fit_iterations": 3, "restarts": 1, "lbfgs_iterations": 1}},
                          torch.device("cpu"))
    state = {k: torch.randn_like(v) if k.startswith("net.") else v
             for k, v in _sol_model(fam.s, None, torch.float32).correction.state_dict().items()}
    trained = {"correction": state, "use_correction": False}
    fc = fam.forecast(data["H01"][0], trained)
    assert fc.extra["use_correction"] is False
    assert fc.extra["sol_error_vs_fine"] == fc.extra["coarse_error_vs_fine"]


def test_sol_bench_quick_schema():
    from neurohybrid.disorders.alzheimer.sol_bench import run

    out = run(quick=True)
    assert out["disorder"] == "alzheimer" and out["tolerance"] > 0 and out["error_metric"] and out["coarse_setup"]
    assert set(out["train_seconds"]) == {"sol", "sol_precomputed"}
    keys = {"case", "fine_s", "coarse_s", "sol_s", "sol_precomputed_s", "coarse_error", "sol_error",
            "sol_precomputed_error"}
    assert out["cases"] and all(keys <= set(c) for c in out["cases"])
    summary = out["summary"]
    for key in keys - {"case"} | {"speedup_vs_fine", "speedup_equal_accuracy"}:
        assert key in summary
    assert summary["fine_s"] > summary["coarse_s"] > 0
