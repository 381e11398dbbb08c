"""Network diffusion / Fisher-KPP solvers against exact solutions and scipy references."""

from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from neurohybrid.errors import InputError
from neurohybrid.solvers.network import (
    laplacian,
    rk4_substeps,
    simulate_network,
    simulate_network_torch,
)

HCP83 = Path("/work/shared/data/connectome-hcp-dk83/hcp-scale1-adjacency-matrix.csv")


def random_connectome(n, seed=0, density=0.6):
    rng = np.random.default_rng(seed)
    w = rng.lognormal(size=(n, n)) * (rng.random((n, n)) < density)
    w = np.triu(w, 1)
    return w + w.T


@pytest.fixture(scope="module")
def lap12():
    return laplacian(random_connectome(12))


def test_laplacian_rows_sum_to_zero_and_psd():
    w = random_connectome(9, seed=1)
    w[np.diag_indices(9)] = 5.0  # self-loops must not matter
    lap = laplacian(w)
    w0 = w.copy()
    np.fill_diagonal(w0, 0)
    assert np.allclose(lap, (np.diag(w0.sum(1)) - w0) / w0.max())
    assert np.allclose(lap.sum(axis=1), 0, atol=1e-12)
    assert np.allclose(lap, lap.T)
    assert np.linalg.eigvalsh(lap).min() > -1e-12
    assert np.allclose(laplacian(w, normalise=None), np.diag(w0.sum(1)) - w0)


def test_laplacian_volume_scaling():
    w = random_connectome(7, seed=2)
    vol = np.array([1.0, 2.0, 3.0, 1.5, 0.5, 2.5, 1.0]) * 1000.0
    lap = laplacian(w)
    v = vol / vol.mean()
    left = laplacian(w, volumes=vol, volume_scaling="left")
    sym = laplacian(w, volumes=vol, volume_scaling="symmetric")
    assert np.allclose(left, lap / v[:, None])
    assert np.allclose(sym, sym.T)
    assert np.allclose(np.sort(np.linalg.eigvals(left).real), np.linalg.eigvalsh(sym), atol=1e-10)
    # the left form conserves the total amount sum V u
    assert np.allclose(v @ left, 0, atol=1e-12)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (np.ones((3, 4)), "square"),
        (np.array([[0, 1.0], [2.0, 0]]), "symmetric"),
        (np.array([[0, -1.0], [-1.0, 0]]), "negative"),
        (np.array([[0, np.nan], [np.nan, 0]]), "NaN"),
        (np.zeros((3, 3)), "no connections"),
    ],
)
def test_laplacian_rejects_bad_connectomes(bad, msg):
    with pytest.raises(InputError, match=msg):
        laplacian(bad)


def test_diffusion_equals_matrix_exponential(lap12):
    rng = np.random.default_rng(3)
    u0 = rng.random(12)
    t = np.array([0.0, 0.5, 2.0, 7.0, 20.0])
    kappa = 0.3
    out = simulate_network(lap12, u0, t, kappa=kappa, model="diffusion", rtol=1e-12, atol=1e-14)
    exact = np.array([expm(-kappa * lap12 * tk) @ u0 for tk in t])
    assert out.shape == (1, 5, 12)
    assert np.abs(out[0] - exact).max() < 1e-8


def test_diffusion_conserves_mass(lap12):
    u0 = np.zeros(12)
    u0[[0, 5]] = [0.7, 0.2]
    out = simulate_network(lap12, u0, np.linspace(0, 30, 7), kappa=0.5, model="diffusion")
    assert np.allclose(out[0].sum(axis=1), 0.9, atol=1e-10)
    assert out[0, -1].std() < out[0, 1].std()  # and it spreads


def _scipy_fkpp(lap, u0, t, kappa, alpha, base=None, cap=None):
    if base is None:
        def f(_t, u):
            return -kappa * lap @ u + alpha * u * (1 - u)
    else:
        def f(_t, u):
            return -kappa * lap @ (u - base) + alpha * (u - base) * (cap - u)
    sol = solve_ivp(f, (0.0, t[-1]), u0, t_eval=t, method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.success
    return sol.y.T


def test_fkpp_matches_solve_ivp(lap12):
    u0 = np.zeros(12)
    u0[2] = 0.2
    t = np.arange(0.0, 21.0)
    out = simulate_network(lap12, u0, t, kappa=0.05, alpha=0.25)
    ref = _scipy_fkpp(lap12, u0, t, 0.05, 0.25)
    assert np.abs(out[0] - ref).max() < 1e-6
    assert out[0, -1].mean() > 0.2 > u0.mean()  # it actually grew


def test_local_fkpp_matches_solve_ivp(lap12):
    rng = np.random.default_rng(4)
    base = rng.uniform(1.0, 1.3, 12)
    cap = rng.uniform(2.0, 3.0, 12)
    u0 = base.copy()
    u0[:2] += 0.3
    t = np.arange(0.0, 16.0, 3.0)
    out = simulate_network(lap12, u0, t, kappa=0.04, alpha=0.2, model="local", baseline=base, capacity=cap)
    ref = _scipy_fkpp(lap12, u0, t, 0.04, 0.2, base, cap)
    assert np.abs(out[0] - ref).max() < 1e-6


def test_fixed_points(lap12):
    t = np.array([0.0, 10.0, 50.0])
    for value in (0.0, 1.0):
        out = simulate_network(lap12, np.full(12, value), t, kappa=0.1, alpha=0.3)
        assert np.abs(out - value).max() < 1e-9  # L @ 1 is zero only to round-off
    base = np.linspace(1.0, 1.5, 12)
    out = simulate_network(lap12, base, t, kappa=0.1, alpha=0.3, model="local", baseline=base, capacity=base + 1.0)
    assert np.abs(out - base).max() < 1e-12  # exactly: u - b = 0
    # u = c is a fixed point when c - b is uniform (L annihilates constants)
    out = simulate_network(lap12, base + 1.0, t, kappa=0.1, alpha=0.3, model="local", baseline=base,
                           capacity=base + 1.0)
    assert np.abs(out - (base + 1.0)).max() < 1e-9
    # and the state approaches c from a perturbed start
    out = simulate_network(lap12, base + 0.05, np.array([0.0, 200.0]), kappa=0.1, alpha=0.3, model="local",
                           baseline=base, capacity=base + 1.0)
    assert np.abs(out[0, -1] - (base + 1.0)).max() < 1e-3


def test_batched_equals_one_by_one(lap12):
    rng = np.random.default_rng(5)
    B = 7
    kappa = rng.uniform(0.02, 0.1, B)
    alpha = rng.uniform(0.0, 0.3, B)
    u0 = rng.uniform(0, 0.2, (B, 12))
    t = np.arange(0.0, 11.0, 2.0)
    # rk4 on a fixed grid: batching must not change a single bit of arithmetic beyond round-off
    batched = simulate_network(lap12, u0, t, kappa=kappa, alpha=alpha, method="rk4", dt=0.05, chunk=3)
    single = np.concatenate([simulate_network(lap12, u0[b], t, kappa=kappa[b], alpha=alpha[b], method="rk4", dt=0.05)
                             for b in range(B)])
    assert np.abs(batched - single).max() < 1e-13
    # adaptive: members share steps within a chunk, so agreement is to the tolerance
    batched = simulate_network(lap12, u0, t, kappa=kappa, alpha=alpha, chunk=4, threads=2)
    single = np.concatenate([simulate_network(lap12, u0[b], t, kappa=kappa[b], alpha=alpha[b]) for b in range(B)])
    assert np.abs(batched - single).max() < 1e-7
    for b in (0, 6):
        assert np.abs(batched[b] - _scipy_fkpp(lap12, u0[b], t, kappa[b], alpha[b])).max() < 1e-6


def test_output_times_not_starting_at_zero(lap12):
    u0 = np.zeros(12)
    u0[0] = 0.3
    full = simulate_network(lap12, u0, np.array([0.0, 2.5, 5.0]), kappa=0.1, alpha=0.1)
    later = simulate_network(lap12, u0, np.array([2.5, 5.0]), kappa=0.1, alpha=0.1)
    assert np.abs(full[:, 1:] - later).max() < 1e-7


def test_rk4_substeps_land_on_outputs():
    steps = rk4_substeps([0.0, 1.0, 1.0, 2.5], 0.0, 0.3)
    assert steps.tolist() == [0, 4, 0, 5]


def test_bad_inputs(lap12):
    with pytest.raises(InputError, match="u0"):
        simulate_network(lap12, np.zeros(5), [0, 1], kappa=0.1)
    with pytest.raises(InputError, match="NaN"):
        simulate_network(lap12, np.full(12, np.nan), [0, 1], kappa=0.1)
    with pytest.raises(InputError, match="non-decreasing"):
        simulate_network(lap12, np.zeros(12), [0, 2, 1], kappa=0.1)
    with pytest.raises(InputError, match="baseline"):
        simulate_network(lap12, np.zeros(12), [0, 1], kappa=0.1, model="local")


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_torch_twin_equals_numba(lap12, dtype, tol):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    kappa = rng.uniform(0.02, 0.1, 3)
    alpha = rng.uniform(0.05, 0.3, 3)
    u0 = rng.uniform(0, 0.3, (3, 12))
    t = np.arange(0.0, 6.0)
    ref = simulate_network(lap12, u0, t, kappa=kappa, alpha=alpha, method="rk4", dt=0.1)
    got = simulate_network_torch(lap12, torch.tensor(u0, dtype=getattr(torch, dtype)), t, kappa=kappa, alpha=alpha,
                                 method="rk4", dt=0.1)
    assert got.dtype == getattr(torch, dtype)
    assert got.shape == (3, 6, 12)
    assert np.abs(got.double().numpy() - ref).max() < tol
    # torchdiffeq's adaptive solver agrees to its tolerance
    ode = simulate_network_torch(lap12, u0, t, kappa=kappa, alpha=alpha, method="dopri5", rtol=1e-9, atol=1e-11)
    assert np.abs(ode.numpy() - ref).max() < 1e-6


def test_torch_local_model_equals_numba(lap12):
    pytest.importorskip("torch")
    base = np.linspace(1.0, 1.2, 12)
    cap = base + 1.5
    u0 = base + np.linspace(0.0, 0.3, 12)
    t = np.arange(0.0, 4.0)
    ref = simulate_network(lap12, u0, t, kappa=0.05, alpha=0.2, model="local", baseline=base, capacity=cap,
                           method="rk4", dt=0.1)
    got = simulate_network_torch(lap12, u0, t, kappa=0.05, alpha=0.2, model="local", baseline=base, capacity=cap,
                                 method="rk4", dt=0.1)
    assert np.abs(got.numpy() - ref).max() < 1e-12


def test_torch_gradcheck():
    torch = pytest.importorskip("torch")
    lap = torch.tensor(laplacian(random_connectome(4, seed=7)))
    kappa = torch.tensor([0.2, 0.1], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.3, 0.5], dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([[0.2, 0.0, 0.1, 0.0], [0.0, 0.3, 0.0, 0.05]], dtype=torch.float64, requires_grad=True)

    def fn(k, a, u):
        return simulate_network_torch(lap, u, [0.0, 1.0, 2.0], kappa=k, alpha=a, method="rk4", dt=0.25)

    assert torch.autograd.gradcheck(fn, (kappa, alpha, u0), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not HCP83.exists(), reason="HCP DK-83 test connectome not available")
def test_hcp83_batch_matches_scipy():
    w = np.loadtxt(HCP83, delimiter=",")
    lap = laplacian(w)
    rng = np.random.default_rng(8)
    B = 16
    kappa = rng.uniform(0.02, 0.06, B)
    alpha = rng.uniform(0.01, 0.3, B)
    u0 = np.zeros((B, 83))
    u0[:, [5, 46]] = 0.1
    t = np.arange(0.0, 21.0)
    out = simulate_network(lap, u0, t, kappa=kappa, alpha=alpha)
    for b in (0, B - 1):
        assert np.abs(out[b] - _scipy_fkpp(lap, u0[b], t, kappa[b], alpha[b])).max() < 1e-6
