"""A real single-node SLURM cluster for the tests (and for trying the `slurm` launcher by hand).

Debian's packages (`munge`, `slurmctld`, `slurmd`, `slurm-client`) are installed if missing; then a
private MUNGE daemon, the controller and one compute node are started from a folder of their own:
their own key, sockets, ports, state, logs and pid files, so nothing system-wide is touched and
`stop()` ends exactly the three daemons that `start()` began. No systemd and no cgroups are needed:
processes are tracked by `proctrack/linuxproc` (the parent-pid tree), which is how SLURM reaches
every process of a job step with a signal, wandb's background service included.

Accounting (slurmdbd and a database) is deliberately left out, as on many small clusters: `sacct`
then fails, and the launcher must follow jobs with `squeue` alone (speedrun/slurm.py).

By hand (as root):

    python -m tests.slurm_cluster start /tmp/slurm    # prints the SLURM_CONF to export
    python -m tests.slurm_cluster stop /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
# SLURM checks time limits (and sends a job's time-limit warning) once every 30 s, fixed in slurmctld
# (PERIODIC_TIMEOUT): a test of time limits waits for one of these checks.
TIME_LIMIT_CHECK_S = 30


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be started here (not root, no apt, a daemon that does not come up)."""


def install_packages() -> None:
    """apt-get the SLURM and MUNGE packages unless their daemons are already installed."""
    if all(shutil.which(name) for name in [*DAEMONS, "sbatch"]):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # the package lists may be missing (a fresh container): fetch them once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])
        raise ClusterUnavailable(f"`{' '.join(command)}` failed: {tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> tuple[int, int]:
    """(CPUs, memory in MB) as `slurmd -C` reports them for this machine."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return int(fields["CPUs"]), int(fields["RealMemory"])


class SlurmCluster:
    """One controller and one node on this machine, configured and run from `root`."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.hostname = socket.gethostname()
        self.cpus = cpus
        self.started_at: float | None = None

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def env(self) -> dict:
        """The environment that points SLURM's commands (sbatch, squeue, scancel, ...) at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        detected_cpus, memory_mb = node_hardware()
        # At least 2 CPUs, so that a 2-task job fits on a small machine: `config_overrides` lets the node
        # declare more than it has rather than being drained for it.
        cpus = self.cpus or max(detected_cpus, 2)
        for folder in ("state", "spool", "log", "run"):
            self.path(folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""# A single-node SLURM cluster, as the speedrun tests run it.
ClusterName=speedrun
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket={self.path("run/munge.socket")},cred_expire=5
StateSaveLocation={self.path("state")}
SlurmdSpoolDir={self.path("spool")}
SlurmctldPidFile={self.path("run/slurmctld.pid")}
SlurmdPidFile={self.path("run/slurmd.pid")}
SlurmctldLogFile={self.path("log/slurmctld.log")}
SlurmdLogFile={self.path("log/slurmd.log")}
# No cgroups or systemd needed: a job's processes are the tree under its tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: `sacct` does not work, as on many small clusters.
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
# Seconds between a job's SIGTERM and its SIGKILL (scancel, time limit); finished jobs stay visible
# to squeue for MinJobAge seconds.
KillWait=30
MinJobAge=300
SchedulerParameters=sched_interval=1
# debug2 logs each time-limit check ("Testing job time limits"), which the time-limit test waits for.
SlurmctldDebug=debug2
NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self, timeout_s: float = 30) -> SlurmCluster:
        install_packages()
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmd needs root")
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        key = self.path("munge.key")
        if not key.exists():
            self._run(["mungekey", "--create", f"--keyfile={key}"])
        self._run(
            ["munged", "--force", f"--socket={self.path('run/munge.socket')}", f"--key-file={key}",
             f"--pid-file={self.path('run/munged.pid')}", f"--log-file={self.path('log/munged.log')}",
             f"--seed-file={self.path('run/munged.seed')}"]
        )  # fmt: skip
        # -c: clear saved state, so that a folder reused from an earlier session starts with no old jobs.
        self._run(["slurmctld", "-c", "-f", str(self.conf)])
        self.started_at = time.time()
        self._run(["slurmd", "-f", str(self.conf)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.2)
        self.stop()
        raise ClusterUnavailable(
            f"the node did not become idle within {timeout_s:.0f} s; see {self.root}/log"
        )

    def _run(self, command: list[str]) -> None:
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"`{command[0]}` failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def stop(self) -> None:
        """End the daemons this cluster started (by their pid files), and any job still running on it."""
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        for daemon in reversed(DAEMONS):
            pid_file = self.path(f"run/{daemon}.pid")
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a daemon that exited but was not reaped yet (our own child) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop FOLDER", file=sys.stderr)
        return 2
    cluster = SlurmCluster(Path(argv[1]))
    if argv[0] == "stop":
        cluster.stop()
        return 0
    try:
        cluster.start()
    except ClusterUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
