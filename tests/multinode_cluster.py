"""A throwaway multi-node Slurm cluster on ONE machine: each node is a network namespace (own
address on a bridge, own hostname, own /etc/hosts) running its own slurmd; one slurmctld and one
munged (with a fresh key) run in the root namespace. Needs root, ``ip netns`` and slurm-wlm/munge.

    python -m tests.multinode_cluster up --nodes 2      # prints: export SLURM_CONF=...
    python -m tests.multinode_cluster down              # removes every cluster 'up' started

Recipe: /work/shared/notes/multinode-netns.md (verified on this host). Why the odd bits:
- slurmd is started through ``nsenter --net`` + ``unshare --mount --uts``, not ``ip netns exec``,
  which remounts /sys and hides the cgroup tree slurmd 22.05 insists on initialising;
- the namespaces have NO default route and resolv.conf says ``nameserver 127.0.0.1``: c10d
  reverse-resolves its peers, and a lookup that goes to an unreachable DNS server takes 10 s each;
- slurmctld runs in its own UTS namespace with hostname ``ctl`` (it checks that it is SlurmctldHost).
Tests may send traffic only to these namespaces' addresses: nothing here routes anywhere else.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # also run as ``python -m tests.multinode_cluster``
    sys.path.insert(0, HERE)

from slurm_cluster import _exe, common_slurm_conf  # noqa: E402

REGISTRY = "/run/mps-multinode"
"""One JSON file per live cluster: what to remove if its owner died (a crashed test run)."""
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why this host cannot run the cluster, or None. Probes ``ip netns add`` for real: a
    container may be root and still lack CAP_SYS_ADMIN / CAP_NET_ADMIN."""
    if os.geteuid() != 0:
        return "multi-node test cluster needs root (network namespaces, slurmd)"
    missing = [d for d in DAEMONS if not (shutil.which(d) or os.path.exists(f"/usr/sbin/{d}"))]
    missing += [t for t in ("ip", "nsenter", "unshare") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install slurmctld slurmd slurm-client munge iproute2 util-linux"
    probe = f"mpsprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int | None) -> bool:
    return bool(pid) and os.path.exists(f"/proc/{pid}")  # root here: /proc shows every process


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this host already routes or holds an address in."""
    nets = []
    for args in (("-4", "route", "show", "table", "all"), ("-4", "-o", "addr")):
        for line in _ip(*args, check=False).stdout.splitlines():
            for word in line.split():
                if "/" in word or word.count(".") == 3:
                    try:
                        net = ipaddress.ip_network(word, strict=False)
                    except ValueError:
                        continue
                    if net.prefixlen > 0:  # the default route covers everything: not a clash
                        nets.append(net)
    return nets


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200-10.254 that nothing on this host uses (checked against routes and addresses)."""
    taken = _taken_networks()
    start = os.getpid() % 55
    for k in range(55 * 4):
        second, third = 200 + (start + k) % 55, (os.getpid() + k * 37) % 250 + 1
        net = ipaddress.ip_network(f"10.{second}.{third}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x /24 subnet found for the test cluster")


class MultiNodeCluster:
    """K nodes ``n1..nK``; ``environ()`` points Slurm's clients at it. ``start()`` / ``stop()``;
    ``stop`` is idempotent and also removes what a crashed owner left (see ``remove``)."""

    def __init__(self, folder: str, nodes: int = 2, gpus_per_node: int = 4, cpus: int = 8) -> None:
        if not 1 <= nodes <= 8:
            raise ValueError(f"nodes must be 1..8 (got {nodes})")
        self.folder = os.path.abspath(folder)
        self.k, self.gpus, self.cpus = nodes, gpus_per_node, cpus
        self.tag = f"mps{os.getpid() % 100000}{int(time.time() * 1000) % 100}"  # <= 10 chars: IFNAMSIZ is 15
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.netns = {n: f"{self.tag}{n}" for n in self.names}
        self.bridge = f"{self.tag}br"
        self.conf = os.path.join(self.folder, "etc", "slurm.conf")
        self.procs: list[subprocess.Popen] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.addr: dict[str, str] = {}
        self.setup_s: float | None = None

    # ---- what users of the cluster need -------------------------------------------------------
    def environ(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        return env

    def run_in(self, node: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A command inside a node's network namespace (tc, ip link ...)."""
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns[node]}", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=self.environ(), capture_output=True, text=True, timeout=30
        )
        return dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())

    def wait_idle(self, nodes: list[str] | None = None, timeout_s: float = 60.0) -> None:
        """Until every (given) node is idle again (after a fault was repaired)."""
        want = nodes or self.names
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n, "").rstrip("*~#") == "idle" for n in want):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout_s:.0f} s: {self.node_states()}; logs in {self.folder}/log")

    # ---- start ----------------------------------------------------------------------------------
    def _record(self, owner: int | None) -> None:
        os.makedirs(REGISTRY, exist_ok=True)
        entry = {
            "owner_pid": owner,
            "folder": self.folder,
            "bridge": self.bridge,
            "netns": list(self.netns.values()),
            "pids": [p.pid for p in self.procs],
        }
        with open(os.path.join(REGISTRY, f"{self.tag}.json"), "w") as f:
            json.dump(entry, f)

    def _network(self) -> None:
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())
        gw = str(hosts[0])
        _ip("link", "add", self.bridge, "type", "bridge")
        self._record(os.getpid())  # from here on there is something to clean up
        _ip("addr", "add", f"{gw}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, n in enumerate(self.names, start=1):
            ns, veth = self.netns[n], f"{self.tag}v{i}"
            self.addr[n] = str(hosts[10 + i])
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[n]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # and no default route: see the docstring
        self.addr["ctl"] = gw

    def _write_config(self) -> None:
        f = self.folder
        for d in ("etc", "log", "state", "spool", "munge"):
            os.makedirs(os.path.join(f, d), exist_ok=True)
        os.chmod(os.path.join(f, "munge"), 0o755)  # munged wants its socket's folder world-executable
        key = os.path.join(f, "munge", "munge.key")
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(key, 0o400)
        for i in range(self.gpus):
            link = os.path.join(f, f"fakegpu{i}")
            if not os.path.lexists(link):
                os.symlink("/dev/null", link)  # Slurm's GRES accepts a device file: no real GPU needed
        with open("/etc/hosts") as fh:
            base = fh.read()
        with open(os.path.join(f, "etc", "hosts"), "w") as fh:
            fh.write(base + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        with open(os.path.join(f, "etc", "resolv.conf"), "w") as fh:
            fh.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        sock = os.path.join(f, "munge", "munge.socket")
        nodes = "".join(
            f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs={self.cpus} RealMemory=20000 "
            f"Gres=gpu:{self.gpus} State=UNKNOWN\n"
            for n in self.names
        )
        conf = (
            common_slurm_conf("mpsmn", f"ctl({self.addr['ctl']})", sock, first_job_id=500_000)
            + f"""SchedulerType=sched/backfill
StateSaveLocation={f}/state
SlurmctldPidFile={f}/slurmctld.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdSpoolDir={f}/spool/%n
SlurmdPidFile={f}/slurmd.%n.pid
SlurmdLogFile={f}/log/slurmd.%n.log
SlurmdTimeout=10
MessageTimeout=5
TCPTimeout=2
KillWait=5
InactiveLimit=0
MailProg=/bin/true
JobRequeue=1
{nodes}PartitionName=mn Nodes={",".join(self.names)} Default=YES MaxTime=120 State=UP OverSubscribe=FORCE:4
"""
        )
        with open(self.conf, "w") as fh:
            fh.write(conf)
        with open(os.path.join(f, "etc", "gres.conf"), "w") as fh:
            fh.write(
                "AutoDetect=off\n"
                + "".join(f"NodeName={n} Name=gpu File={f}/fakegpu[0-{self.gpus - 1}]\n" for n in self.names)
            )

    def _spawn(self, cmd: list[str], log: str) -> None:
        with open(os.path.join(self.folder, "log", log), "ab") as out:
            self.procs.append(
                subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.environ(), start_new_session=True)
            )

    def start(self, timeout_s: float = 60.0, owner: int | None = -1) -> MultiNodeCluster:
        """owner: the PID whose death makes this cluster stale (-1: this process; None: nobody, for
        the command line's ``up``, whose clusters only ``down`` removes)."""
        t0 = time.time()
        os.makedirs(self.folder, exist_ok=True)
        try:
            self._network()
            self._write_config()
            f, sock = self.folder, os.path.join(self.folder, "munge", "munge.socket")
            self._spawn(
                [
                    _exe("munged"),
                    "-F",
                    "--force",
                    f"--socket={sock}",
                    f"--key-file={f}/munge/munge.key",
                    f"--pid-file={f}/munge/munged.pid",
                    f"--log-file={f}/log/munged.log",
                    f"--seed-file={f}/munge/munged.seed",
                ],
                "munged.out",
            )
            self._wait(lambda: os.path.exists(sock), timeout_s, "munged socket")
            self._spawn(
                ["unshare", "--uts", "sh", "-c", f"hostname ctl && exec {_exe('slurmctld')} -D -c -f {self.conf}"],
                "slurmctld.out",
            )
            etc = os.path.join(f, "etc")
            for n in self.names:
                inner = (
                    f"mount --bind {etc}/hosts /etc/hosts && mount --bind {etc}/resolv.conf /etc/resolv.conf "
                    f"&& hostname {n} && exec {_exe('slurmd')} -D -N {n} -f {self.conf}"
                )
                self._spawn(
                    ["nsenter", f"--net=/run/netns/{self.netns[n]}", "unshare", "--mount", "--uts", "sh", "-c", inner],
                    f"slurmd.{n}.out",
                )
            self._record(os.getpid() if owner == -1 else owner)
            self.wait_idle(timeout_s=max(1.0, timeout_s - (time.time() - t0)))
        except BaseException:
            self.stop()
            raise
        self.setup_s = time.time() - t0
        return self

    @staticmethod
    def _wait(ok, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while not ok():
            if time.time() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s")
            time.sleep(0.05)

    # ---- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Remove everything: daemons, every process left in the nodes (job steps outlive slurmd),
        namespaces, links, the registry entry. Safe to call twice."""
        entry = os.path.join(REGISTRY, f"{self.tag}.json")
        if os.path.exists(entry):
            remove(entry)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)  # reaped: no zombies left to the test process
        self.procs.clear()


def _kill_all(pids: list[int], timeout_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + timeout_s
        while any(_pid_alive(p) and not _zombie(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def remove(entry_path: str) -> None:
    """Tear down the cluster one registry entry describes (ours, or a crashed run's)."""
    with open(entry_path) as f:
        e = json.load(f)
    _kill_all(e.get("pids", []))  # slurmctld, munged, slurmd (by PID: nothing else of that name)
    for ns in e["netns"]:
        # job steps, srun, tasks: whatever still runs inside the node (each is ours: the namespace is)
        for _ in range(20):
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            _kill_all(pids, timeout_s=2.0)
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", e["bridge"], check=False)
    deadline = time.time() + 5  # netns deletion is asynchronous: wait until its veth is gone
    tag = e["bridge"][:-2]  # the veths are named <tag>v<i>
    while time.time() < deadline and tag in _ip("-o", "link", check=False).stdout:
        time.sleep(0.1)
    # a dead namespace can linger in the kernel (seen here: its veth still up a minute later, no
    # process left in it); deleting our end of the pair removes both ends
    for line in _ip("-o", "link", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(tag):
            _ip("link", "del", name, check=False)
    shutil.rmtree(os.path.join(e["folder"], "state"), ignore_errors=True)
    shutil.rmtree(os.path.join(e["folder"], "spool"), ignore_errors=True)
    os.unlink(entry_path)


def remove_stale() -> list[str]:
    """Clusters whose owner process is dead (a killed pytest): removed. Returns their folders."""
    gone = []
    if not os.path.isdir(REGISTRY):
        return gone
    for name in sorted(os.listdir(REGISTRY)):
        path = os.path.join(REGISTRY, name)
        try:
            with open(path) as f:
                owner = json.load(f).get("owner_pid")
        except (OSError, ValueError):
            continue
        if owner is not None and not _pid_alive(owner):
            with open(path) as f:
                gone.append(json.load(f)["folder"])
            remove(path)
    return gone


def cluster_fixture(tmp_path_factory, nodes: int = 2):
    """Generator for a module-scoped pytest fixture: stale leftovers removed first, the cluster
    removed afterwards (also when the test failed, and at interpreter exit if pytest is killed
    between tests)."""
    remove_stale()
    cluster = MultiNodeCluster(str(tmp_path_factory.mktemp("multinode")), nodes=nodes)
    atexit.register(cluster.stop)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.multinode_cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster of --nodes nodes and print how to use it")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--gpus-per-node", type=int, default=4, help="fake GPUs (GRES) per node")
    up.add_argument("--folder", default=None, help="where config, logs and state go (default: a new temp folder)")
    sub.add_parser("down", help="stop every cluster that 'up' started (and any stale test cluster)")
    a = p.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if a.cmd == "down":
        removed = remove_stale()
        for name in sorted(os.listdir(REGISTRY)) if os.path.isdir(REGISTRY) else []:
            with open(os.path.join(REGISTRY, name)) as f:
                e = json.load(f)
            if e.get("owner_pid") is None:
                remove(os.path.join(REGISTRY, name))
                removed.append(e["folder"])
        print(f"removed {len(removed)} cluster(s)" + "".join(f"\n  {f}" for f in removed))
        return 0
    if not 1 <= a.nodes <= 8:
        print(f"error: --nodes must be 1..8 (got {a.nodes})", file=sys.stderr)
        return 2
    remove_stale()
    folder = a.folder or tempfile.mkdtemp(prefix="mps-multinode-")
    c = MultiNodeCluster(folder, nodes=a.nodes, gpus_per_node=a.gpus_per_node).start(owner=None)
    print(f"{a.nodes} node(s) up in {c.setup_s:.2f} s: " + ", ".join(f"{n}={c.addr[n]}" for n in c.names))
    print(f"export SLURM_CONF={c.conf}")
    print(f"try:    SLURM_CONF={c.conf} srun -N{a.nodes} hostname")
    print("stop:   python -m tests.multinode_cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
