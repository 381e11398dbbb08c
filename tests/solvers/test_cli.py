"""`neurohybrid simulate ...` on tiny files: results, units in --help, and every bad input."""

import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neurohybrid.cli import main
from neurohybrid.solvers.network import laplacian, simulate_network

AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 2.0, 0, -12.0], [0, 0, 2.0, -8.0], [0, 0, 0, 1]])
SHAPE = (10, 12, 8)


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return str(path)


@pytest.fixture
def tissue(tmp_path):
    wm = np.zeros(SHAPE)
    gm = np.zeros(SHAPE)
    gm[1:9, 1:11, 1:7] = 0.8
    wm[3:7, 3:9, 2:6] = 0.9
    gm[wm > 0] = 0.1
    return _save(tmp_path / "wm.nii.gz", wm), _save(tmp_path / "gm.nii.gz", gm), wm, gm


def _fails(argv, capsys, out, *expected):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    for word in expected:
        assert word in err, err
    assert not out.exists()
    # no temporary file left behind either
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# glioma


def test_glioma_runs_and_writes_on_input_grid(tmp_path, tissue):
    wm_path, gm_path, wm, gm = tissue
    out = tmp_path / "u.nii.gz"
    # world (0, 0, 0) -> voxel (5, 6, 4) through the inverse affine
    rc = main(["simulate", "glioma", "--wm", wm_path, "--gm", gm_path, "--seed-mm", "0", "0", "0",
               "--dw", "0.2", "--rho", "0.05", "--days", "20", "--out", str(out), "--threads", "1"])
    assert rc == 0
    img = nib.load(str(out))
    u = img.get_fdata()
    assert u.shape == SHAPE
    assert np.allclose(img.affine, AFFINE)
    assert np.unravel_index(np.argmax(u), SHAPE) == (5, 6, 4)
    assert 0 < u.max() <= 1
    assert np.all(u[(wm + gm) == 0] == 0)


@pytest.mark.parametrize(
    "change, words",
    [
        ("seed_outside_image", ["outside the image"]),
        ("seed_outside_tissue", ["outside brain tissue"]),
        ("shape", ["shape"]),
        ("affine", ["affine"]),
        ("nan", ["NaN"]),
        ("range", ["[0.0, 1.0]"]),
        ("empty", ["empty brain"]),
        ("negative_dw", ["--dw"]),
    ],
)
def test_glioma_bad_input(tmp_path, tissue, capsys, change, words):
    wm_path, gm_path, wm, gm = tissue
    seed = ["0", "0", "0"]
    dw = "0.2"
    if change == "seed_outside_image":
        seed = ["100", "0", "0"]
    elif change == "seed_outside_tissue":
        seed = ["-10", "-12", "-8"]  # voxel (0, 0, 0): background
    elif change == "shape":
        gm_path = _save(tmp_path / "gm2.nii.gz", np.zeros((10, 12, 9)))
    elif change == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 4.0
        gm_path = _save(tmp_path / "gm2.nii.gz", gm, shifted)
    elif change == "nan":
        bad = wm.copy()
        bad[0, 0, 0] = np.nan
        wm_path = _save(tmp_path / "wm2.nii.gz", bad)
    elif change == "range":
        wm_path = _save(tmp_path / "wm2.nii.gz", wm * 255)
    elif change == "empty":
        wm_path = _save(tmp_path / "wm2.nii.gz", np.zeros(SHAPE))
        gm_path = _save(tmp_path / "gm2.nii.gz", np.zeros(SHAPE))
    elif change == "negative_dw":
        dw = "-0.1"
    out = tmp_path / "out" / "u.nii.gz"
    out.parent.mkdir()
    _fails(["simulate", "glioma", "--wm", wm_path, "--gm", gm_path, "--seed-mm", *seed, "--dw", dw,
            "--days", "5", "--out", str(out)], capsys, out, *words)


# ---------------------------------------------------------------------------------------------
# Alzheimer's disease


def _connectome(tmp_path, n=6, name="c.csv", weights=None):
    if weights is None:
        rng = np.random.default_rng(1)
        weights = rng.random((n, n))
        weights = weights + weights.T
        np.fill_diagonal(weights, 0)
    names = [f"R{i}" for i in range(weights.shape[1])]
    path = tmp_path / name
    pd.DataFrame(weights, columns=names).to_csv(path, index=False)
    return str(path), weights, names


def test_alzheimer_trajectory_tsv(tmp_path):
    cpath, weights, names = _connectome(tmp_path)
    out = tmp_path / "traj.tsv"
    rc = main(["simulate", "alzheimer", "--connectome", cpath, "--seed-regions", "R1,R4", "--kappa", "0.05",
               "--alpha", "0.2", "--years", "5", "--dt-years", "0.5", "--out", str(out)])
    assert rc == 0
    frame = pd.read_csv(out, sep="\t")
    assert list(frame.columns) == ["time", *names]
    assert np.allclose(frame["time"], np.arange(0, 5.01, 0.5))
    u0 = np.zeros(6)
    u0[[1, 4]] = 0.1
    ref = simulate_network(laplacian(weights), u0, frame["time"].to_numpy(), kappa=0.05, alpha=0.2)[0]
    assert np.abs(frame[names].to_numpy() - ref).max() < 1e-8
    assert frame.loc[0, "R1"] == 0.1 and frame.loc[0, "R0"] == 0.0


def test_alzheimer_final_time_always_written(tmp_path):
    cpath, _, _ = _connectome(tmp_path)
    out = tmp_path / "traj.tsv"
    assert main(["simulate", "alzheimer", "--connectome", cpath, "--seed-regions", "R0", "--kappa", "0.1",
                 "--years", "2.5", "--out", str(out)]) == 0
    assert pd.read_csv(out, sep="\t")["time"].tolist() == [0.0, 1.0, 2.0, 2.5]


@pytest.mark.parametrize("case, words", [
    ("unknown_region", ["unknown region", "R9"]),
    ("non_square", ["square"]),
    ("asymmetric", ["symmetric"]),
    ("nan", ["NaN"]),
    ("negative_kappa", ["--kappa"]),
    ("missing", ["not found"]),
])
def test_alzheimer_bad_input(tmp_path, capsys, case, words):
    seeds = "R0,R1"
    kappa = "0.05"
    if case == "non_square":
        cpath, _, _ = _connectome(tmp_path, weights=np.ones((3, 5)))
    elif case == "asymmetric":
        w = np.arange(16.0).reshape(4, 4)
        cpath, _, _ = _connectome(tmp_path, weights=w)
    elif case == "nan":
        w = np.ones((4, 4))
        w[1, 2] = w[2, 1] = np.nan
        cpath, _, _ = _connectome(tmp_path, weights=w)
    else:
        cpath, _, _ = _connectome(tmp_path)
    if case == "unknown_region":
        seeds = "R0,R9"
    elif case == "negative_kappa":
        kappa = "-1"
    elif case == "missing":
        cpath = str(tmp_path / "nope.csv")
    out = tmp_path / "out" / "traj.tsv"
    out.parent.mkdir()
    _fails(["simulate", "alzheimer", "--connectome", cpath, "--seed-regions", seeds, "--kappa", kappa,
            "--out", str(out)], capsys, out, *words)


# ---------------------------------------------------------------------------------------------
# stroke


@pytest.fixture
def cbf_map(tmp_path):
    cbf = np.full(SHAPE, 56.0)
    cbf[2:5, 2:5, 2:4] = 3.0  # core
    cbf[6:8, 6:8, 4:6] = 17.0  # penumbra
    return _save(tmp_path / "cbf.nii.gz", cbf), cbf


def test_stroke_dead_fraction_map(tmp_path, cbf_map, tissue):
    cbf_path, cbf = cbf_map
    out_early = tmp_path / "early.nii.gz"
    out_late = tmp_path / "late.nii.gz"
    for reperf, out in (("1", out_early), ("6", out_late)):
        assert main(["simulate", "stroke", "--cbf", cbf_path, "--reperfusion-h", reperf, "--followup-h", "48",
                     "--out", str(out)]) == 0
    early = nib.load(str(out_early)).get_fdata()
    late = nib.load(str(out_late)).get_fdata()
    assert np.allclose(nib.load(str(out_late)).affine, AFFINE)
    assert late[3, 3, 3] > 0.8  # core dies
    assert late[0, 0, 0] < 1e-3  # normal perfusion survives
    assert early[7, 7, 5] < late[7, 7, 5]  # earlier reperfusion saves penumbra
    # the WM correction changes the answer where WM is present
    wm_path = tissue[0]
    out_wm = tmp_path / "wm_dead.nii.gz"
    assert main(["simulate", "stroke", "--cbf", cbf_path, "--wm", wm_path, "--reperfusion-h", "6",
                 "--followup-h", "48", "--out", str(out_wm), "--cbf-after", "50"]) == 0
    with_wm = nib.load(str(out_wm)).get_fdata()
    assert with_wm[6, 6, 4] < late[6, 6, 4]  # WM voxel: 17 x 2.7 is well perfused


@pytest.mark.parametrize("case, words", [
    ("wm_shape", ["shape"]),
    ("wm_affine", ["affine"]),
    ("nan", ["NaN"]),
    ("negative", ["values must lie"]),
    ("too_high", ["values must lie"]),
    ("empty", ["empty brain"]),
    ("empty_mask", ["empty brain"]),
    ("cbf_after", ["--cbf-after"]),
    ("negative_time", ["--reperfusion-h"]),
])
def test_stroke_bad_input(tmp_path, cbf_map, capsys, case, words):
    cbf_path, cbf = cbf_map
    extra = []
    reperf = "3"
    if case == "wm_shape":
        extra = ["--wm", _save(tmp_path / "wm.nii.gz", np.zeros((10, 12, 7)))]
    elif case == "wm_affine":
        extra = ["--wm", _save(tmp_path / "wm.nii.gz", np.zeros(SHAPE), AFFINE * np.array([[1], [1], [1.5], [1]]))]
    elif case == "nan":
        bad = cbf.copy()
        bad[1, 1, 1] = np.nan
        cbf_path = _save(tmp_path / "bad.nii.gz", bad)
    elif case == "negative":
        cbf_path = _save(tmp_path / "bad.nii.gz", cbf - 10)
    elif case == "too_high":
        cbf_path = _save(tmp_path / "bad.nii.gz", cbf * 100)  # wrong units
    elif case == "empty":
        cbf_path = _save(tmp_path / "bad.nii.gz", np.zeros(SHAPE))
    elif case == "empty_mask":
        extra = ["--mask", _save(tmp_path / "mask.nii.gz", np.zeros(SHAPE))]
    elif case == "cbf_after":
        extra = ["--cbf-after", "-5"]
    elif case == "negative_time":
        reperf = "-1"
    out = tmp_path / "out" / "dead.nii.gz"
    out.parent.mkdir()
    _fails(["simulate", "stroke", "--cbf", cbf_path, "--reperfusion-h", reperf, "--followup-h", "24",
            "--out", str(out), *extra], capsys, out, *words)


@pytest.mark.parametrize("model, units", [
    ("glioma", ["mm^2/day", "1/day", "days", "mm"]),
    ("alzheimer", ["1/year", "years"]),
    ("stroke", ["ml/100 ml/min", "hours"]),
])
def test_help_states_units(capsys, model, units):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", model, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for unit in units:
        assert unit in text


def test_bench_network_and_stroke_print_json(capsys):
    import json

    assert main(["bench", "network", "--sets", "6", "--years", "2", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["benchmark"] == "network_fkpp" and res["parameter_sets"] == 6
    assert res["max_abs_diff_vs_scipy"] < 1e-5  # both integrators solved the same problems
    assert res["numba_solves_per_s"] > 0 and res["speedup_per_solve"] > 0
    assert main(["bench", "stroke", "--stroke-shape", "4", "3", "2", "--hours", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["voxels"] == 24 and res["voxel_hours_per_s"] > 0


def test_bench_sol_dispatches_to_each_disorders_benchmark(capsys, monkeypatch):
    """`bench sol` runs each chosen disorder's ``sol_bench.run`` (tested in tests/disorders) and adds
    the machine; here a stand-in module records the call."""
    import json
    import types

    calls = []
    for disorder in ("glioma", "stroke"):
        fake = types.ModuleType(f"neurohybrid.disorders.{disorder}.sol_bench")
        fake.run = lambda quick, seed, d=disorder: calls.append((d, quick, seed)) or {"disorder": d, "cases": []}
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert main(["bench", "sol", "--quick", "--disorder", "stroke", "--disorder", "glioma", "--seed", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert calls == [("stroke", True, 3), ("glioma", True, 3)]
    assert [r["disorder"] for r in res] == ["stroke", "glioma"]
    assert all(r["benchmark"] == "solver_in_the_loop" and r["wall_seconds"] >= 0 and "cpu_count" in r for r in res)


# ---------------------------------------------------------------------------------------------
# checked before any work: output paths, work budgets, integrator limits


def _argv(model, tmp_path, tissue, cbf_map, out, **over):
    if model == "glioma":
        args = {"--wm": tissue[0], "--gm": tissue[1], "--seed-mm": ["0", "0", "0"], "--days": "5", "--dw": "0.2"}
    elif model == "alzheimer":
        args = {"--connectome": _connectome(tmp_path)[0], "--seed-regions": "R0", "--kappa": "0.05", "--years": "4"}
    else:
        args = {"--cbf": cbf_map[0], "--followup-h": "24"}
    args.update(over)
    argv = ["simulate", model]
    for key, value in args.items():
        argv += [key, *(value if isinstance(value, list) else [value])]
    return argv + ["--out", str(out)]


@pytest.mark.parametrize("model, over, words", [
    ("glioma", {"--days": "1e9"}, ["voxel-steps", "--max-steps"]),
    ("glioma", {"--dw": "1e6", "--days": "365"}, ["voxel-steps", "--max-steps"]),
    ("glioma", {"--threads": "0"}, ["--threads"]),
    ("alzheimer", {"--kappa": "1e9"}, ["solver steps", "--max-steps"]),
    ("alzheimer", {"--years": "1e9"}, ["output rows", "--max-steps"]),
    ("stroke", {"--followup-h": "1e9"}, ["voxel-steps", "--max-steps"]),
    ("stroke", {"--dt-s": "3600"}, ["--dt-s", "900"]),
    ("stroke", {"--dt-s": "1800"}, ["--dt-s", "unstable beyond 1289 s"]),
])
def test_runs_beyond_budget_or_limits_stop_at_once(tmp_path, tissue, cbf_map, capsys, model, over, words):
    import time

    out = tmp_path / "out" / ("t.tsv" if model == "alzheimer" else "u.nii.gz")
    out.parent.mkdir()
    start = time.perf_counter()
    _fails(_argv(model, tmp_path, tissue, cbf_map, out, **over), capsys, out, *words)
    assert time.perf_counter() - start < 10.0  # refused up front, not after the work


@pytest.mark.parametrize("model", ["glioma", "alzheimer", "stroke"])
@pytest.mark.parametrize("case", ["directory", "extension", "no_folder"])
def test_bad_out_paths_refused_before_any_work(tmp_path, tissue, cbf_map, capsys, model, case):
    good = "t.tsv" if model == "alzheimer" else "u.nii.gz"
    out = {"directory": tmp_path / "adir", "extension": tmp_path / "u.txt", "no_folder": tmp_path / "none" / good}[case]
    if case == "directory":
        out.mkdir()
    rc = main(_argv(model, tmp_path, tissue, cbf_map, out))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert {"directory": "is a directory", "extension": "must end in", "no_folder": "does not exist"}[case] in err
    assert str(out.name) in err


def test_stroke_solver_refuses_steps_beyond_rk4_stability():
    from neurohybrid.errors import InputError
    from neurohybrid.solvers.stroke import simulate_tissue_death

    assert np.isfinite(simulate_tissue_death(np.array([10.0]), hours=24.0, dt_s=1200.0)["dead"]).all()
    with pytest.raises(InputError, match="stability"):
        simulate_tissue_death(np.array([10.0]), hours=24.0, dt_s=3600.0)
