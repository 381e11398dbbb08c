"""Interrupted runs resume with the documented command (`make run` = `neurohybrid run`): after
SIGTERM and after SIGKILL mid-preprocessing, rerunning gives the metrics of an uninterrupted run;
a second run never touches a live run's lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from conftest import REPO, SNAKEFILE, write_config, write_participants

SUBJECTS = [("stroke01", "stroke"), ("stroke02", "stroke")]


def _config(work: Path) -> Path:
    coarse = {"model_voxel_mm": 8.0}
    participants = write_participants(work / "participants.tsv", SUBJECTS)
    return write_config(work / "config.yaml", participants=str(participants), sloppy=True, seed=7, device="cpu",
                        synth={"voxel_mm": 4.0, "dwi_subjects": 0}, preprocessing={"fast": True},
                        models={"families": ["persistence", "mechanistic"], "n_folds": 2, "fit_iterations": 5},
                        glioma=coarse, alzheimer=coarse, stroke=coarse)


def _command(work: Path) -> list[str]:
    """What `make run` runs, pointed at a scratch folder."""
    return [str(Path(sys.executable).parent / "neurohybrid"), "run", "--snakefile", str(SNAKEFILE), "--directory",
            str(work), "--configfile", str(work / "config.yaml"), "--workflow-profile",
            str(REPO / "workflow" / "profiles" / "default"), "--cores", "2"]


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start(work: Path) -> subprocess.Popen:
    return subprocess.Popen(_command(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)


def _wait_for(path_glob: str, work: Path, proc: subprocess.Popen, timeout=300.0) -> None:
    start = time.monotonic()
    while not list(work.glob(path_glob)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, f"{path_glob} never appeared"
        time.sleep(0.5)


def _metrics(work: Path) -> pd.DataFrame:
    """The cohort metrics, less wall-clock timings (which differ between any two runs)."""
    frame = pd.read_csv(work / "results" / "cohort" / "metrics.tsv", sep="\t")
    return frame[~frame["metric"].str.endswith("_seconds")].reset_index(drop=True)


def test_interrupted_runs_resume_with_the_same_command(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    _config(reference)
    done = subprocess.run(_command(reference), capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    work = tmp_path / "interrupted"
    work.mkdir()
    _config(work)
    # SIGTERM during preprocessing: one line saying so, and how to resume
    proc = _start(work)
    _wait_for("results/logs/preprocess_anat/*.log", work, proc)
    # a second run in the same folder while this one lives: refused, the live run untouched
    second = subprocess.run(_command(work), capture_output=True, text=True, env=_env(), timeout=120)
    assert second.returncode == 2 and "another run is active in this folder" in second.stderr
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == ("neurohybrid run: interrupted by SIGTERM; run the same command again "
                                            "to resume")

    # SIGKILL of the whole run (runner, snakemake, its jobs) mid-preprocessing: snakemake's lock stays
    proc = _start(work)
    _wait_for(".snakemake/locks/*", work, proc)
    _wait_for(".snakemake/incomplete/*", work, proc)  # a job of this run is running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert list((work / ".snakemake" / "locks").iterdir()), "a killed snakemake leaves its lock"

    resumed = subprocess.run(_command(work), capture_output=True, text=True, env=_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "clearing the lock of an interrupted run" in resumed.stderr
    pd.testing.assert_frame_equal(_metrics(work), _metrics(reference))
