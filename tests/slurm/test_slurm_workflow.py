"""The real neurohybrid workflow on a tiny sloppy cohort, once through Slurm with the slurm
profile and once locally: every job COMPLETED in sacct, and the same outputs (up to timings)."""

from __future__ import annotations

import json
import os
import re
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

# One glioma subject, persistence + mechanistic (neither has a fold component for glioma, so no
# train_model job; stroke's mechanistic model has one, its population prior, and would need two):
# synth -> preprocess (anat, lesions) -> model inputs -> forecast -> evaluate -> cohort table,
# stats and figures, the smallest DAG that still runs every stage of the real workflow. Runs in
# `make test`: measured 2026-11-26 on the shared 2-core machine (load average 1.2-1.8, cluster
# packages already installed): 3 min 16 s, of which ~185 s for the two runs side by side (the
# Slurm run waits ~25 s per DAG level on the plugin's status checks; its jobs take ~45 s).
# Until Atropos got a constant seed (preprocessing/segmentation.py) the tissue maps of the two
# runs differed (up to 0.015; model-input WM maps up to 0.006 in 12 % of voxels here, 0.013 with
# two subjects) while N4, brain mask and transforms agreed; with the old segmentation.py this
# test fails naming exactly those files.
pytestmark = [pytest.mark.slurm]

SUBJECTS = [("glioma01", "glioma")]
FAMILIES = ["persistence", "mechanistic"]
# run on the submitting host: the target rule and the provenance rule (`localrules`)
LOCAL_RULES = {"all", "provenance"}
TIMING_FIGURES = ("boxplot_", "sol_accuracy_cost")  # cohort figures drawing wall-clock timings


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


def snakemake_cmd(workdir: Path, config: Path, *args: str, env: dict) -> tuple[list[str], dict]:
    env = dict(env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `neurohybrid` for the rules
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", str(config),
           *args]
    return cmd, env


def run_snakemake(workdir: Path, config: Path, *args: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    cmd, env = snakemake_cmd(workdir, config, *args, env=env)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def without_timings(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop rows of wall-clock measurements (they differ between any two runs)."""
    for col in ("metric", "measure"):  # metrics tables; treatment plans (measure, value, unit)
        if col in frame.columns:
            frame = frame[~frame[col].astype(str).str.endswith("_seconds")]
    return frame.reset_index(drop=True)


def outputs(results: Path) -> list[Path]:
    """Every file under results/ (relative), but logs, benchmarks and snakemake's timestamps."""
    return sorted(p.relative_to(results) for p in results.rglob("*")
                  if p.is_file() and p.relative_to(results).parts[0] not in ("logs", "benchmarks")
                  and not p.name.startswith(".snakemake"))


def assert_same_file(a: Path, b: Path, root_a: Path, root_b: Path) -> int:
    """a (under root_a) and b (under root_b) hold the same result; 1 if compared, 0 if skipped.

    Images and arrays up to float noise, tables and JSON up to wall-clock timings and the run's
    own folder (dataset_description.json names its source by absolute path), anything else byte
    for byte, except the cohort figures that plot wall-clock timings (fit_seconds, sol_cost_seconds).
    """
    name = a.name
    rel = a.relative_to(root_a)
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
        x = _no_timings(json.loads(a.read_text().replace(str(root_a.parent), "<run>")))
        y = _no_timings(json.loads(b.read_text().replace(str(root_b.parent), "<run>")))
        assert _close(x, y), f"{name}: {x} != {y}"
    elif rel.parts[0] == "cohort" and name.startswith(TIMING_FIGURES):
        return 0
    else:
        assert a.read_bytes() == b.read_bytes(), name
    return 1


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


def planned_rules(workdir: Path, config: Path, env: dict) -> dict[str, int]:
    """Rule -> job count of the whole DAG, from snakemake's own dry-run job table."""
    dry = run_snakemake(workdir, config, "--dry-run", "--quiet", "rules", env=env, timeout=120)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-4000:]
    lines = (dry.stdout + dry.stderr).splitlines()
    table = lines[lines.index("Job stats:") + 3:]
    counts = {}
    for line in table:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    assert counts, "\n".join(lines[-40:])
    return counts


def test_workflow_through_slurm_equals_local_run(slurm, tmp_path):
    config = tiny_config(tmp_path)
    planned = planned_rules(tmp_path / "local", config, slurm.env)
    # the local run goes alongside the Slurm run, which mostly waits for the scheduler (saves a
    # minute of wall time; the two runs also see different loads)
    cmd, env = snakemake_cmd(tmp_path / "local", config, "--cores", "2", env=slurm.env)
    local_log = tmp_path / "local.log"
    t0 = time.monotonic()
    with open(local_log, "w") as log:
        local = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        profile = cluster_profile(tmp_path / "profile", slurm)
        jobs_before = {j["JobID"] for j in slurm.sacct()}
        # --max-threads: the test node has 2 CPUs, fewer than some rules ask for on a real cluster
        remote = run_snakemake(tmp_path / "slurm", config, "--profile", str(profile), "--max-threads", "2",
                               "--slurm-init-seconds-before-status-checks", "5", env=slurm.env, timeout=1500)
        t_slurm = time.monotonic() - t0
        local.wait(timeout=1200)
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
    print(f"tiny cohort, both runs at once: through slurm {t_slurm:.0f} s, in all {time.monotonic() - t0:.0f} s")
    assert local.returncode == 0, local_log.read_text()[-4000:]
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
        print(f"sacct: job {job['JobID']} {job['Comment']} {job['State']} {job['ExitCode']}")
        last[job["Comment"]] = job
    assert last and all(j["State"] == "COMPLETED" for j in last.values()), list(last.values())
    # each rule of the DAG ran in a Slurm job (grouped per-subject rules share one job, named
    # after its rules), whatever the rules are called
    missing = [r for r in planned if r not in LOCAL_RULES
               and not any(re.search(rf"(^|_){r}(_|$)", comment) for comment in last)]
    assert not missing, (missing, sorted(last))

    # the same outputs as the local run, every file of results/ but logs, benchmarks and
    # snakemake's own bookkeeping
    out_local, out_slurm = tmp_path / "local" / "results", tmp_path / "slurm" / "results"
    files_local = outputs(out_local)
    assert files_local == outputs(out_slurm)
    for folder in ("preproc", "inputs", "targets", "forecasts", "metrics", "cohort"):
        assert any(p.parts[0] == folder for p in files_local), f"no outputs in {folder}"
    compared, differ = 0, {}
    for rel in files_local:
        try:
            compared += assert_same_file(out_local / rel, out_slurm / rel, out_local, out_slurm)
        except AssertionError as exc:  # name every differing file, not just the first
            differ[str(rel)] = str(exc).strip().splitlines()[:5]
    print(f"{compared} of {len(files_local)} output files compared, {len(differ)} differ")
    assert not differ, json.dumps(differ, indent=1)
