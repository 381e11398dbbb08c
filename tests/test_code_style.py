"""`make lint`'s code checks, run by `make test` (and so by CI): ruff on the package, tests and
benchmarks (rules in pyproject.toml), snakefmt on the workflow. `snakemake --lint` runs in
tests/workflow/test_dag.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args):
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    result = _run("ruff", "check", "--no-cache", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_workflow_is_snakefmt_formatted():
    result = _run("snakefmt", "--check", "Snakefile", "workflow/rules")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
