"""A per-job scratch folder inside the output folder, for every temporary a job writes.

Libraries write their own temporaries to the process's temporary folder (ANTsPy's Atropos and
registration call ``tempfile.mktemp``, nipype's interfaces and our ``TemporaryDirectory`` calls
likewise): pointing ``tempfile.tempdir`` and ``TMPDIR`` at the job's folder catches them all, so
nothing lands outside ``output_dir`` and one ``rmtree`` removes everything on success and on
failure. A folder left by a killed job is cleared when the same job runs again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

SCRATCH = ".work"  # under the output folder


@contextlib.contextmanager
def job_workdir(out: str | Path, name: str):
    """Run the block with all temporaries in ``<out>/.work/<name>`` (name unique per job)."""
    root = Path(out) / SCRATCH
    work = root / name
    shutil.rmtree(work, ignore_errors=True)  # a killed run's leftovers
    work.mkdir(parents=True)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(work)
    os.environ["TMPDIR"] = str(work)  # child processes (FSL, MRtrix3 via nipype)
    try:
        yield work
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(work, ignore_errors=True)  # (the shared .work folder stays: other jobs may be using it)
