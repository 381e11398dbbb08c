"""Helpers for the workflow tests: run snakemake on the repository's Snakefile in a scratch folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def snakemake(workdir: Path, configfile: Path | None, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run snakemake with the interpreter running the tests, `neurohybrid` on PATH, cwd = workdir."""
    env = dict(os.environ)
    # the rules call `neurohybrid` from PATH: the console script beside this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def write_config(path: Path, **overrides) -> Path:
    """The default config with top-level keys replaced (nested dicts merged one level deep)."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_participants(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("participant_id\tdisorder\n" + "".join(f"sub-{s}\t{d}\n" for s, d in rows))
    return path


@pytest.fixture
def run_snakemake():
    return snakemake
