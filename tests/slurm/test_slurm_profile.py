"""The slurm profile (workflow/profiles/slurm) against a real Slurm: jobs go through sbatch,
sacct lists them COMPLETED, a job killed for memory is retried with more, and a failing job
fails the run with its log named."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def cluster_profile(dest: Path, slurm) -> Path:
    """The repository's profile with only account and partition changed (what a user edits)."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"]["slurm_account"] = slurm.account
    profile["default-resources"]["slurm_partition"] = slurm.partition
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


TINY_SNAKEFILE = """
rule all:
    input: "out/b.txt", "out/oom.txt", "out/fail.txt"

rule a:
    output: "out/a.txt"
    log: "logs/a.log"
    shell: "echo job=$SLURM_JOB_ID > {output} 2> {log}"

rule b:
    input: "out/a.txt"
    output: "out/b.txt"
    log: "logs/b.log"
    shell: "(cat {input}; echo job=$SLURM_JOB_ID) > {output} 2> {log}"

# needs ~1.6 GB: over the profile's default mem_mb (1000 * attempt) at attempt 1, within it at 2
rule oom:
    output: "out/oom.txt"
    log: "logs/oom.log"
    params: py=PYTHON
    shell:
        "{params.py} -c 'import numpy, time; a = numpy.ones(1500 * 2**20 // 8); time.sleep(8)' > {log} 2>&1"
        " && echo mem_mb={resources.mem_mb} > {output}"

rule fail:
    output: "out/fail.txt"
    log: "logs/fail.log"
    retries: 0
    shell: "(echo boom-from-the-failing-rule; exit 3) > {log} 2>&1"
"""


def wait_for_sacct(slurm, expected_jobs: int, timeout: float = 60):
    """sacct records arrive a few seconds after a job ends."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = slurm.sacct()
        done = [j for j in jobs if j["State"] not in ("PENDING", "RUNNING", "COMPLETING")]
        if len(done) >= expected_jobs or time.monotonic() > deadline:
            return jobs
        time.sleep(2)


def test_profile_runs_jobs_through_slurm(slurm, tmp_path):
    work = tmp_path / "wf"
    work.mkdir()
    (work / "Snakefile").write_text(f"PYTHON = {sys.executable!r}\n" + textwrap.dedent(TINY_SNAKEFILE))
    profile = cluster_profile(tmp_path / "profile", slurm)
    t0 = time.monotonic()
    run = subprocess.run(
        [*SNAKEMAKE, "--profile", str(profile), "--slurm-init-seconds-before-status-checks", "5",
         "--directory", str(work), "--snakefile", str(work / "Snakefile")],
        cwd=work, env=slurm.env, capture_output=True, text=True, timeout=480,
    )
    elapsed = time.monotonic() - t0
    output = run.stdout + run.stderr
    print(f"snakemake through slurm: {elapsed:.0f} s, exit {run.returncode}")

    # the failing job fails the run, and the report names its log
    assert run.returncode != 0, output[-3000:]
    assert "logs/fail.log" in output, output[-3000:]
    assert "boom-from-the-failing-rule" in (work / "logs" / "fail.log").read_text()

    # the rest ran inside Slurm jobs (keep-going): distinct job ids from the job environment
    b = (work / "out" / "b.txt").read_text().split()
    ids = [int(x.split("=")[1]) for x in b]
    assert len(ids) == 2 and ids[0] != ids[1] and all(i > 0 for i in ids)
    # killed for memory at attempt 1, finished with twice the memory at attempt 2
    assert (work / "out" / "oom.txt").read_text().strip() == "mem_mb=2000"

    jobs = wait_for_sacct(slurm, expected_jobs=5)
    by_rule: dict[str, list[str]] = {}
    ids_of: dict[str, list[str]] = {}
    for job in jobs:
        m = re.match(r"rule_([A-Za-z0-9_]+?)(_wildcards_.*)?$", job["Comment"])
        if m:
            by_rule.setdefault(m.group(1), []).append(job["State"])
            ids_of.setdefault(m.group(1), []).append(job["JobID"])
    assert by_rule.get("a") == ["COMPLETED"], jobs
    assert by_rule.get("b") == ["COMPLETED"], jobs
    assert by_rule.get("fail") == ["FAILED"], jobs
    # without cgroups Slurm kills by polling (OverMemoryKill): the allocation ends FAILED and
    # its step CANCELLED rather than OUT_OF_MEMORY; slurmd's log says it was the memory limit
    assert by_rule.get("oom") == ["FAILED", "COMPLETED"], jobs
    first_oom = ids_of["oom"][0]
    assert re.search(rf"StepId={first_oom}\.\d+ exceeded memory limit", slurm.daemon_log("slurmd")), \
        slurm.daemon_log("slurmd")[-2000:]
    # the jobs' ids in the outputs are the ones sacct reports for rules a and b
    completed_ids = {int(j["JobID"]) for j in jobs if j["State"] == "COMPLETED"}
    assert set(ids) <= completed_ids
