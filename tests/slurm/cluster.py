"""A throw-away single-node Slurm cluster on localhost, for tests.

Installs Debian's slurmctld, slurmd, slurm-client, munge, slurmdbd and mariadb-server (when not
already installed), writes every config into a private folder, starts munged, mariadbd,
slurmdbd, slurmctld and slurmd in the foreground as background processes (no systemd, no
cgroups here), registers cluster, account and user for accounting, and on exit stops exactly
the processes it started, by PID, even when the test fails.

Facts this relies on are in ../shared/notes/slurm.md (sacct needs slurmdbd + MariaDB; without
cgroups: proctrack/linuxproc and task/none; slurmd -N localhost so the node name does not depend
on the host name).

Usage::

    with SlurmCluster() as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["munged", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "sacct", "sacctmgr", "scontrol", "sinfo", "setpriv"]
CLUSTER = "nhtest"
ACCOUNT = "nhacct"
PARTITION = "debug"
# srun inside a job must find the config without SLURM_CONF: snakemake-executor-plugin-slurm-jobstep
# (0.6) strips every SLURM_* variable but the job's identity before its nested srun, so the job
# step falls back to the default path (then to a DNS SRV lookup, which fails). The cluster links
# its config there while it runs, and only if nothing else is there.
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be brought up here (not root, no apt, install failed)."""


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def why_unavailable() -> str | None:
    """None if a cluster can be brought up here, else the reason in words."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "not a POSIX system"
    if os.geteuid() != 0:
        return "needs root (installs packages and runs Slurm daemons as root)"
    if _missing_binaries() and shutil.which("apt-get") is None:
        return f"Slurm/MariaDB/munge not installed ({', '.join(_missing_binaries())}) and apt-get is unavailable"
    return None


def install(timeout: float = 900) -> None:
    """apt-get install the packages unless all their programs are already present."""
    if not _missing_binaries():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}")
    if _missing_binaries():
        raise ClusterUnavailable(f"installed, yet missing: {', '.join(_missing_binaries())}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Context manager: a running single-node cluster; ``env`` points clients at it."""

    def __init__(self, cpus: int = 2, real_memory_mb: int = 16000, base: str | Path | None = None,
                 cleanup: bool | None = None):
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        # not pytest's tmp_path: that lies under a 0700 folder the munge user cannot enter
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="nh-slurm-"))
        self.base.chmod(0o755)
        self.procs: dict[str, subprocess.Popen] = {}
        self.linked_conf: Path | None = None
        # NH_SLURM_KEEP=1 keeps configs, logs and database for a look after a failure
        self.cleanup = (os.environ.get("NH_SLURM_KEEP") != "1") if cleanup is None else cleanup
        self.env = dict(os.environ)
        self.account = ACCOUNT
        self.partition = PARTITION
        self.cluster_name = CLUSTER

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        atexit.register(self.stop)  # also when the interpreter exits without reaching __exit__
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._layout()
        self._start_munge()
        self._start_mariadb()
        self._start_slurmdbd()
        self._register_accounting()
        self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.slurm_conf)])
        self._wait("slurmctld", lambda: "UP" in self._run(["scontrol", "ping"], check=False).stdout)
        self._start("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.slurm_conf)])
        self._wait("slurmd", lambda: self._run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], check=False)
                   .stdout.strip() in ("idle", "mix", "alloc"))

    def stop(self) -> None:
        """Stop the daemons this object started, newest first: SIGTERM, then SIGKILL after 15 s.

        Each daemon runs in its own session, so job steps (slurmstepd) it left behind are in
        its process group and are stopped with it; nothing else is touched.
        """
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # a process of the group that outlived its leader (e.g. slurmstepd)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.linked_conf is not None and self.linked_conf.is_symlink() \
                and os.readlink(self.linked_conf) == str(self.slurm_conf):
            self.linked_conf.unlink()
        self.linked_conf = None
        if self.cleanup and not self.procs:
            shutil.rmtree(self.base, ignore_errors=True)  # the database alone is ~100 MB

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    # -- helpers -------------------------------------------------------------------------------

    def _run(self, cmd, check=True, **kwargs) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def _start(self, name: str, cmd: list[str], user: str | None = None) -> None:
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
        out = open(self.base / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, cwd=self.base)
        out.close()

    def _log_tail(self, name: str) -> str:
        texts = []
        for path in sorted((self.base / "log").glob(f"{name}*")):
            texts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def _wait(self, name: str, ready, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self._log_tail(name)}")
            try:
                if ready():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} not ready after {timeout} s:\n{self._log_tail(name)}")

    # -- configuration -------------------------------------------------------------------------

    def _layout(self) -> None:
        b = self.base
        for sub in ("etc", "log", "state", "spool", "run", "db"):
            (b / sub).mkdir(exist_ok=True)
        self.ports = {k: _free_port() for k in ("ctld", "slurmd", "dbd", "mysql")}
        # the standard socket path: Slurm 22.05's clients ignore AuthInfo=socket= when they talk
        # to slurmdbd (sacctmgr fails with "Failed to access /run/munge/munge.socket.2")
        self.munge_socket = Path("/run/munge/munge.socket.2")
        self.mysql_socket = b / "run" / "mysqld.sock"
        self.slurm_conf = b / "etc" / "slurm.conf"
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        self.slurm_conf.write_text(
            f"ClusterName={CLUSTER}\n"
            "SlurmctldHost=localhost(127.0.0.1)\n"
            f"SlurmctldPort={self.ports['ctld']}\nSlurmdPort={self.ports['slurmd']}\n"
            + auth +
            "CredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n"
            f"StateSaveLocation={b / 'state'}\nSlurmdSpoolDir={b / 'spool'}\n"
            f"SlurmctldPidFile={b / 'run' / 'slurmctld.pid'}\nSlurmdPidFile={b / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={b / 'log' / 'slurmctld.log'}\nSlurmdLogFile={b / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            # memory is enforced by polling (no cgroups): a job over its --mem ends OUT_OF_MEMORY
            "JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=task=1\n"
            "JobAcctGatherParams=OverMemoryKill\n"
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={self.ports['dbd']}\n"
            "AccountingStoreFlags=job_comment\nAccountingStorageEnforce=associations\n"
            "MinJobAge=300\nReturnToService=2\nSchedulerType=sched/backfill\nMpiDefault=none\n"
            "SchedulerParameters=sched_interval=2\n"
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.db_password = os.urandom(8).hex()
        dbd_conf = b / "etc" / "slurmdbd.conf"  # slurmdbd looks beside SLURM_CONF
        dbd_conf.write_text(
            auth +
            f"DbdHost=localhost\nDbdPort={self.ports['dbd']}\nSlurmUser=root\n"
            f"PidFile={b / 'run' / 'slurmdbd.pid'}\nLogFile={b / 'log' / 'slurmdbd.log'}\n"
            "StorageType=accounting_storage/mysql\n"
            f"StorageHost=127.0.0.1\nStoragePort={self.ports['mysql']}\n"
            f"StorageUser=slurm\nStoragePass={self.db_password}\nStorageLoc=slurm_acct_db\n"
        )
        dbd_conf.chmod(0o600)  # slurmdbd refuses a readable password file
        self.env["SLURM_CONF"] = str(self.slurm_conf)
        if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
            raise ClusterUnavailable(f"{DEFAULT_CONF} exists (a real Slurm installation?): not replacing it")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self.slurm_conf)
        self.linked_conf = DEFAULT_CONF

    def _start_munge(self) -> None:
        if self.munge_socket.exists():
            raise ClusterUnavailable(f"{self.munge_socket} exists: another munged is running (or a stale socket)")
        rundir = self.munge_socket.parent
        rundir.mkdir(parents=True, exist_ok=True)
        mdir = self.base / "munge"
        mdir.mkdir(exist_ok=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for path in (mdir, key, rundir):
            os.chown(path, user.pw_uid, user.pw_gid)
        rundir.chmod(0o755)
        mdir.chmod(0o755)  # clients (root) reach the socket; munged checks it is not world-writable
        key.chmod(0o400)
        self._start("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                               f"--seed-file={mdir / 'munged.seed'}"], user="munge")
        self._wait("munged", lambda: self.munge_socket.exists())

    def _start_mariadb(self) -> None:
        datadir = self.base / "db"
        self._run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                   "--auth-root-authentication-method=socket", "--skip-test-db"])
        self._start("mariadbd", [_which("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                                 f"--socket={self.mysql_socket}", f"--port={self.ports['mysql']}",
                                 "--bind-address=127.0.0.1", f"--pid-file={self.base / 'run' / 'mysqld.pid'}",
                                 f"--log-error={self.base / 'log' / 'mariadbd.err'}",
                                 "--innodb-buffer-pool-size=32M", "--skip-log-bin"])
        sql = ["mariadb", "--no-defaults", f"--socket={self.mysql_socket}", "-uroot"]
        self._wait("mariadbd", lambda: self._run([*sql, "-e", "SELECT 1"], check=False).returncode == 0)
        pw = self.db_password
        self._run([*sql, "-e",
                   f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
                   f"CREATE USER 'slurm'@'localhost' IDENTIFIED BY '{pw}';"
                   "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
                   "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"])

    def _start_slurmdbd(self) -> None:
        self._start("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self._run(["sacctmgr", "-n", "list", "cluster"], check=False).returncode == 0)

    def _register_accounting(self) -> None:
        for args in (["add", "cluster", CLUSTER], ["add", "account", ACCOUNT, f"Cluster={CLUSTER}"],
                     ["add", "user", "root", f"Account={ACCOUNT}", f"Cluster={CLUSTER}"]):
            self._run(["sacctmgr", "-i", *args])

    # -- queries ------------------------------------------------------------------------------

    def sacct(self, steps: bool = False) -> list[dict[str, str]]:
        """Every job this cluster has run: JobID, JobName, State, ExitCode, Comment.

        Allocations only, or with ``steps`` also their steps (JobID ``<id>.batch``, ``<id>.0``).
        """
        fields = ["JobID", "JobName", "State", "ExitCode", "Comment"]
        res = self._run(["sacct", *([] if steps else ["-X"]), "-n", "-P", "--allusers", "--starttime", "2000-01-01",
                         "-o", ",".join(fields)])
        return [dict(zip(fields, line.split("|", len(fields) - 1))) for line in res.stdout.splitlines() if line.strip()]

    def daemon_log(self, name: str) -> str:
        """The log a daemon wrote (slurmd.log, slurmctld.log, ...) while the cluster runs."""
        path = self.base / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
