"""A throwaway single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's
slurm-wlm and munge, in a temporary folder, on free ports, with 4 fake GPUs.

The fake GPUs are gres.conf entries whose files are symlinks to /dev/null: Slurm then accepts
and refuses ``--gpus`` requests as on a GPU node (a fake at the one boundary that cannot exist on a
CPU host: the GPU). Everything else is the real daemons. Clients find the cluster through
SLURM_CONF, which ``environ()`` returns.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time

from core.parallel.distributed import free_port

# Each throwaway cluster numbers its jobs from its own start: submitit derives a job's rendezvous
# port from the job id, so two clusters' job 1 (one still tearing down, or a container whose
# ranks outlive its srun for a moment) asked for the same port (EADDRINUSE in CI). Below the
# multi-node clusters' 500,000.
_FIRST_JOB_IDS = itertools.count(1000 + 10_000 * (os.getpid() % 7), 1000)

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
MISSING_REASON = "Slurm daemons not installed: apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"


def available() -> bool:
    found = all(shutil.which(d) or os.path.exists(f"/usr/sbin/{d}") for d in DAEMONS)
    return found and os.path.exists("/etc/munge/munge.key") and os.geteuid() == 0


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def common_slurm_conf(cluster: str, controller: str, munge_socket: str, first_job_id: int) -> str:
    """The slurm.conf keys both throwaway clusters share (this one and tests/multinode_cluster.py):
    root daemons on free ports, munge on a private socket, no accounting, cores as the consumable,
    fake GPUs as GRES, a node that comes back returns to service by itself.

    ``first_job_id`` keeps the two kinds' job ids apart: submitit derives a job's rendezvous port
    from its id (random.Random(job_id)), so job 1 of this cluster and job 1 of a multi-node
    cluster running at the same time on one machine both listened on port 51342 (EADDRINUSE,
    seen when test_slurm_watch and test_multinode ran side by side)."""
    return f"""ClusterName={cluster}
FirstJobId={first_job_id}
SlurmctldHost={controller}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=30
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EnforcePartLimits=ALL
MinJobAge=600
ReturnToService=2
GresTypes=gpu
"""


class SlurmCluster:
    def __init__(self, folder: str, gpus: int = 4, cpus: int = 8) -> None:
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self.gpus, self.cpus = gpus, cpus
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(folder, "slurm.conf")

    def environ(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        return env

    def _write_config(self) -> None:
        f = self.folder
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(f, d), exist_ok=True)
        for i in range(self.gpus):
            link = os.path.join(f, f"fakegpu{i}")
            if not os.path.lexists(link):
                os.symlink("/dev/null", link)
        sock = os.path.join(f, "munge.sock")
        conf = (
            common_slurm_conf("mpstest", self.host, sock, first_job_id=next(_FIRST_JOB_IDS))
            + f"""StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
KillWait=10
NodeName={self.host} CPUs={self.cpus} RealMemory=20000 Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=120 State=UP OverSubscribe=FORCE:4
"""
        )
        with open(self.conf, "w") as fh:
            fh.write(conf.lstrip())
        with open(os.path.join(f, "gres.conf"), "w") as fh:
            last = self.gpus - 1
            fh.write(f"AutoDetect=off\nNodeName={self.host} Name=gpu File={f}/fakegpu[0-{last}]\n")

    def start(self, timeout_s: float = 30.0) -> SlurmCluster:
        self._write_config()
        f = self.folder
        env = self.environ()
        sock = os.path.join(f, "munge.sock")
        self.procs.append(
            subprocess.Popen(
                [
                    _exe("munged"),
                    "-F",
                    "--force",
                    f"--socket={sock}",
                    "--key-file=/etc/munge/munge.key",
                    f"--pid-file={f}/munged.pid",
                    f"--log-file={f}/log/munged.log",
                    f"--seed-file={f}/munge.seed",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        )
        deadline = time.time() + timeout_s
        while not os.path.exists(sock) and time.time() < deadline:
            time.sleep(0.1)
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(
                subprocess.Popen(
                    [_exe(daemon), "-D", "-f", self.conf], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Slurm did not come up in {timeout_s:.0f} s; logs in {f}/log")

    def _controller(self) -> subprocess.Popen | None:
        return next((p for p in self.procs if "slurmctld" in str(p.args[0])), None)

    def stop_controller(self) -> None:
        """Take slurmctld down (a controller outage); jobs already running go on on their node."""
        p = self._controller()
        if p is not None:
            p.terminate()
            p.wait(timeout=30)
            self.procs.remove(p)

    def start_controller(self, timeout_s: float = 30.0) -> None:
        """Bring slurmctld back; it recovers its jobs from StateSaveLocation."""
        env = self.environ()
        self.procs.insert(
            1,
            subprocess.Popen(
                [_exe("slurmctld"), "-D", "-f", self.conf],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"slurmctld did not come back in {timeout_s:.0f} s; logs in {self.folder}/log")

    def scontrol(self, *args: str) -> str:
        p = subprocess.run(["scontrol", *args], env=self.environ(), capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        self._kill_clients()

    def _kill_clients(self) -> None:
        """srun (and the batch shells) of jobs that were still queued or running when the daemons
        stopped would wait for their controller forever: end every process of this cluster."""
        mine = f"SLURM_CONF={self.conf}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mine in f.read().split(b"\0") and int(pid) != os.getpid():
                        os.kill(int(pid), 9)
            except (OSError, ValueError):
                continue
