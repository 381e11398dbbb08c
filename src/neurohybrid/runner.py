"""`neurohybrid run [snakemake options]`: the workflow, resumable after any interruption.

``make run`` calls it. Snakemake leaves its working-directory lock behind when it is killed
(SIGKILL, power loss), and the next run then stops with ``LockException ... --unlock``; unlocking
by hand is safe only when no other run is alive. This runner holds an OS lock (``flock``) on
``.snakemake/neurohybrid-run.lock`` for as long as it or its snakemake child lives (the child
inherits the locked descriptor, so killing only the runner does not free it). A new run that gets
the lock therefore knows that any snakemake lock it finds is stale and clears it; one that does
not get it stops, naming the live run. SIGTERM and SIGINT are passed on to snakemake, and the run
ends with one line saying it was interrupted and how to resume. Incomplete outputs are redone by
the workflow profile's ``rerun-incomplete``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

from neurohybrid.errors import InputError

REPO_PROFILE = "workflow/profiles/default"


def _workdir(args: list[str]) -> Path:
    """The folder snakemake runs in (its --directory / -d option, else the current one)."""
    folder = _option(args, "--directory", "-d")
    return Path(folder) if folder else Path.cwd()


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _profile(args: list[str]) -> list[str]:
    """The repository's workflow profile, beside the Snakefile (--snakefile, else the current
    folder), unless the options name a profile themselves."""
    if any(a.startswith(("--workflow-profile", "--profile")) for a in args):
        return []
    snakefile = _option(args, "--snakefile", "-s")
    root = Path(snakefile).resolve().parent if snakefile else Path.cwd()
    return ["--workflow-profile", str(root / REPO_PROFILE)]


def _acquire(lock_path: Path) -> int:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = Path(lock_path).read_text().strip() or "unknown"
        os.close(fd)
        raise InputError(f"another run is active in this folder (pid {holder}); wait for it or stop it first",
                         file=lock_path) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def run(snakemake_args: list[str]) -> int:
    workdir = _workdir(snakemake_args)
    fd = _acquire(workdir / ".snakemake" / "neurohybrid-run.lock")
    base = [sys.executable, "-m", "snakemake"]
    profile = _profile(snakemake_args)
    locks = workdir / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        # we hold the run lock, so no live run owns these: a killed run left them
        print("neurohybrid run: clearing the lock of an interrupted run", file=sys.stderr)
        subprocess.run(base + snakemake_args + ["--unlock"], check=True, stdout=subprocess.DEVNULL)
    child = subprocess.Popen(base + profile + snakemake_args, pass_fds=(fd,))
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if received:
        name = signal.Signals(received[0]).name
        print(f"neurohybrid run: interrupted by {name}; run the same command again to resume", file=sys.stderr)
        return 128 + received[0]
    return code


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "run", help="run the workflow (snakemake), resumable after an interruption",
        description="Runs snakemake with the repository's workflow profile and the given snakemake options "
        "(e.g. --cores 4, --configfile config/paper.yaml). A lock left by a killed run is cleared; a live run "
        "in the same folder is never touched. Rerun the same command to resume.",
    )
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="options passed to snakemake")
    p.set_defaults(func=lambda args: run([a for a in args.snakemake_args if a != "--"]))
