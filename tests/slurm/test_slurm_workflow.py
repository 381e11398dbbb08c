"""The real neurohybrid workflow on a tiny sloppy cohort, once through Slurm with the slurm
profile and once locally: every job COMPLETED in sacct, and the same outputs (up to timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from test_slurm_profile import REPO, SNAKEMAKE, cluster_profile

# Measured 2026-11-26 on the shared 2-core machine: local run 132 s + Slurm run 296 s (+ ~20 s
# cluster start), 6 + 14 min under heavy load: too slow for `make test`; runs in `make test-slow`.
# Status then: every Slurm job COMPLETED, but preprocess_anat (ANTs) gave different outputs in the
# two runs (brain mask, transforms), so model inputs differ. Re-run 16:47 with a fixed
# antsRegistration seed and one ITK thread in both runs (4 min 23 s on an idle machine): every job
# COMPLETED again, but model-input WM maps still differ by up to 0.013 in 12% of voxels, so some
# ANTs stage (Atropos initialisation or N4 are the suspects) is still not reproducible. Fails until fixed.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SUBJECTS = [("stroke01", "stroke"), ("stroke02", "stroke")]
FAMILIES = ["persistence", "mechanistic"]
COMPARED = ("inputs", "targets", "forecasts", "metrics", "cohort")


def tiny_config(work: Path) -> Path:
    (work / "participants.tsv").write_text(
        "participant_id\tdisorder\n" + "".join(f"sub-{s}\t{d}\n" for s, d in SUBJECTS))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(participants=str(work / "participants.tsv"), sloppy=True, seed=7, device="cpu")
    cfg["synth"] = {**cfg.get("synth", {}), "voxel_mm": 4.0}
    cfg["preprocessing"] = {**cfg.get("preprocessing", {}), "fast": True}
    cfg["models"] = {**cfg.get("models", {}), "families": FAMILIES, "n_folds": 2, "epochs": 2, "restarts": 1,
                     "fit_iterations": 5}
    for disorder in ("glioma", "alzheimer", "stroke"):
        cfg[disorder] = {**cfg.get(disorder, {}), "model_voxel_mm": 8.0}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_snakemake(workdir: Path, config: Path, *args: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    env = dict(env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `neurohybrid` for the rules
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", str(config),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def without_timings(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop rows of wall-clock measurements (they differ between any two runs)."""
    for col in ("metric",):
        if col in frame.columns:
            frame = frame[~frame[col].astype(str).str.endswith("_seconds")]
    return frame.reset_index(drop=True)


def assert_same_file(a: Path, b: Path) -> None:
    name = a.name
    if name.endswith((".nii.gz", ".nii")):
        x, y = nib.load(a), nib.load(b)
        assert np.allclose(x.affine, y.affine), name
        np.testing.assert_allclose(np.asarray(x.dataobj), np.asarray(y.dataobj), rtol=1e-5, atol=1e-6, err_msg=name)
    elif name.endswith(".npz"):
        with np.load(a) as x, np.load(b) as y:
            assert sorted(x.files) == sorted(y.files), name
            for key in x.files:
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{key}")
    elif name.endswith(".tsv"):
        x = without_timings(pd.read_csv(a, sep="\t", dtype={"subject": str}))
        y = without_timings(pd.read_csv(b, sep="\t", dtype={"subject": str}))
        pd.testing.assert_frame_equal(x, y, rtol=1e-5, atol=1e-6, obj=name)
    elif name.endswith(".json"):
        # wall-clock timings (fit_seconds, calibration_seconds, ...) differ between runs; the rest must not
        x, y = _no_timings(json.loads(a.read_text())), _no_timings(json.loads(b.read_text()))
        assert _close(x, y), f"{name}: {x} != {y}"


def _no_timings(obj):
    if isinstance(obj, dict):
        return {k: _no_timings(v) for k, v in obj.items() if not str(k).endswith("_seconds")}
    if isinstance(obj, list):
        return [_no_timings(v) for v in obj]
    return obj


def _close(x, y) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return bool(np.isclose(x, y, rtol=1e-5, atol=1e-6))
    return x == y


def test_workflow_through_slurm_equals_local_run(slurm, tmp_path):
    config = tiny_config(tmp_path)
    t0 = time.monotonic()
    local = run_snakemake(tmp_path / "local", config, "--cores", "2", env=slurm.env, timeout=1200)
    t_local = time.monotonic() - t0
    assert local.returncode == 0, local.stderr[-4000:]

    profile = cluster_profile(tmp_path / "profile", slurm)
    jobs_before = {j["JobID"] for j in slurm.sacct()}
    t0 = time.monotonic()
    # --max-threads: the test node has 2 CPUs, fewer than some rules ask for on a real cluster
    remote = run_snakemake(tmp_path / "slurm", config, "--profile", str(profile), "--max-threads", "2",
                           "--slurm-init-seconds-before-status-checks", "5", env=slurm.env, timeout=1500)
    t_slurm = time.monotonic() - t0
    print(f"tiny cohort: local {t_local:.0f} s, through slurm {t_slurm:.0f} s")
    assert remote.returncode == 0, (remote.stdout + remote.stderr)[-4000:]

    # every job went through sbatch, and the last attempt of each ended COMPLETED (the profile
    # retries failed jobs; earlier failed attempts are printed, not hidden)
    deadline = time.monotonic() + 60
    while True:
        jobs = [j for j in slurm.sacct() if j["JobID"] not in jobs_before]
        if all(j["State"] not in ("PENDING", "RUNNING", "COMPLETING") for j in jobs) or time.monotonic() > deadline:
            break
        time.sleep(2)
    last: dict[str, dict] = {}
    for job in sorted(jobs, key=lambda j: int(j["JobID"])):
        if job["State"] != "COMPLETED":
            print(f"sacct: job {job['JobID']} ({job['Comment']}) ended {job['State']} {job['ExitCode']}")
        last[job["Comment"]] = job
    assert last and all(j["State"] == "COMPLETED" for j in last.values()), list(last.values())
    rules = {c.split("_wildcards_")[0].removeprefix("rule_") for c in last}
    assert {"synth_cohort", "forecast", "evaluate", "cohort_table", "cohort_stats", "cohort_figures"} <= rules, rules

    # the same outputs as the local run
    out_local, out_slurm = tmp_path / "local" / "results", tmp_path / "slurm" / "results"
    for folder in COMPARED:
        files_local = sorted(p.relative_to(out_local) for p in (out_local / folder).rglob("*") if p.is_file())
        files_slurm = sorted(p.relative_to(out_slurm) for p in (out_slurm / folder).rglob("*") if p.is_file())
        assert files_local == files_slurm, folder
        assert files_local, f"no outputs in {folder}"
        for rel in files_local:
            assert_same_file(out_local / rel, out_slurm / rel)
