"""A real two-node Slurm cluster on this host, from Debian's packages, for the launch tests.

munged, slurmctld and one slurmd per logical node run as child processes of the test session
(no systemd, no cgroups); state, spool, logs and the munge socket live in one temporary folder.
`SlurmCluster.stop` kills exactly the processes `start` created. Run this file to keep a
cluster up by hand: `python -m tests.slurm.cluster` (Ctrl-C or kill stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.run.ports import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
NODES = ("n1", "n2")
CPUS_PER_NODE = 4  # more than the host has: jobs here are many small processes, not cores

SLURM_CONF = """\
ClusterName=tridist-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s): a requeued job starts soon after its delay
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n[1-{n_nodes}] NodeHostname=localhost Port={node_ports} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=n[1-{n_nodes}] Default=YES MaxTime=INFINITE State=UP
"""


def missing_programs() -> list[str]:
    """The Slurm/munge programs this host lacks (empty when the packages are installed)."""
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_ports(n: int) -> list[int]:
    """n consecutive free TCP ports (Slurm's Port=a-b range needs them consecutive)."""
    for _ in range(50):
        base = free_port()
        if base + n < 65000 and all(_port_free(base + i) for i in range(n)):
            return [base + i for i in range(n)]
    raise RuntimeError("no free consecutive ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SlurmCluster:
    """munged + slurmctld + slurmd n1, n2 on this host; `env` points clients at it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tridist-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must reach its socket folder
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        """Write slurm.conf, start the daemons, wait until both nodes are idle."""
        munge = self.root / "munge"
        for d in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True)
        munge.mkdir()
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o711)
        ports = _free_ports(len(NODES) + 1)
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root,
                ctld_port=ports[0],
                n_nodes=len(NODES),
                cpus=CPUS_PER_NODE,
                node_ports=f"{ports[1]}-{ports[-1]}",
            )
        )
        self._spawn(
            "munged",
            [
                "/usr/sbin/munged",
                "-F",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/seed",
            ],
            user="munge",
        )
        self._wait(lambda: (munge / "munge.socket").exists(), 10, "munged")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(
                f"slurmd-{node}", ["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(self.conf)]
            )
        self._wait(self._nodes_idle, timeout, "both nodes idle in sinfo")

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        # a new session: a Ctrl-C in the test terminal reaches pytest, not the daemons
        self._procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=user,
                group=user,
            )
        )
        log.close()

    def _nodes_idle(self) -> bool:
        for p in self._procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs: {self.logs()}")
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return out.count("idle") == len(NODES)

    @staticmethod
    def _wait(ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.2)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def logs(self) -> str:
        """The daemons' log tails, for a failure message."""
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(
                f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
            )
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop the daemons this object started (by PID), then
        remove the folder."""
        if self._procs and self._procs[-1].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                try:
                    self._wait(
                        lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                        30,
                        "cancelled jobs to end",
                    )
                except TimeoutError:
                    pass  # stop the daemons anyway
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the cluster too
    cluster = SlurmCluster()
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
