"""A real single-node Slurm cluster for the tests in this folder (see cluster.py).

Brought up once per test session when a test marked `slurm` asks for it; skipped, with the
reason, where it cannot run (not root, or Slurm not installed and no apt-get). Every daemon it
started is stopped by PID when the tests end, whether they passed or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as slurm_cluster  # noqa: E402


@pytest.fixture(scope="session")
def slurm():
    reason = slurm_cluster.why_unavailable()
    if reason:
        pytest.skip(f"Slurm test skipped: {reason}")
    try:
        slurm_cluster.install()
    except slurm_cluster.ClusterUnavailable as exc:
        pytest.skip(f"Slurm test skipped: {exc}")
    running = slurm_cluster.SlurmCluster()
    try:
        running.__enter__()  # stops whatever it started if bringing the cluster up fails
    except slurm_cluster.ClusterUnavailable as exc:
        pytest.skip(f"Slurm test skipped: {exc}")
    try:
        yield running
    finally:
        running.stop()
