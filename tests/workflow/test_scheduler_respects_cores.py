"""The pinned snakemake never runs more threads at once than `--cores`.

snakemake 9.10-9.26 did not count a job against the free cores when it was the only job ready
(snakemake/snakemake#3913), and gave its cores back when it finished: after a lone job the budget
grew, and 9.15 ran up to 6 one-thread demo jobs at once on 2 cores (on a cluster node, more
cores and memory than asked for). A two-thread job followed by six one-thread jobs reproduces it:
9.15 runs 4 of them at once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SNAKEFILE = textwrap.dedent(
    """
    rule all:
        input: expand("done/{i}", i=range(6))

    rule first:
        output: "first"
        threads: 2
        shell: "sleep 0.5; touch {output}"

    rule after:
        input: "first"
        output: "done/{i}"
        threads: 1
        shell: "echo start $(date +%s.%N) >> log/{wildcards.i}; sleep 1.5; echo end $(date +%s.%N) >> log/{wildcards.i}; touch {output}"
    """
)


def _max_concurrent(logs: Path) -> int:
    events = []
    for f in logs.iterdir():
        times = dict(line.split() for line in f.read_text().splitlines())
        events += [(float(times["start"]), 1), (float(times["end"]), -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def test_one_thread_jobs_after_a_lone_job_stay_within_the_cores(tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "log").mkdir()
    snakemake = Path(sys.executable).parent / "snakemake"
    run = subprocess.run([str(snakemake), "--cores", "2", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((tmp_path / "log").iterdir())) == 6
    assert _max_concurrent(tmp_path / "log") <= 2
