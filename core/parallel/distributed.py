"""One way to start a process group, from torchrun, Slurm/submitit or a local launcher.

``init_distributed`` reads the standard env:// variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), which torchrun sets and ``submitit.helpers.TorchDistributedEnvironment``
exports; with none of them it is a single process and starts no group. NCCL on CUDA, gloo on CPU,
and a timeout on every collective: minutes by default, never torch's 30-minute default, so a dead
rank fails the job instead of hanging it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from core.parallel.layout import Layout


def free_port() -> int:
    """A TCP port free on this host now, for a local rendezvous (MASTER_PORT) or a test daemon."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistState:
    """Where this process runs in the layout; passed as an argument, never global.

    Every degree comes from ``layout`` (core.parallel.layout.Layout); this object adds only what the
    launcher decided: the rank, the device, the backend and the mesh built from the layout."""

    layout: Layout
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: object | None = None
    """DeviceMesh with dimensions ("dp", "pp", "tp") when the layout has more than one process."""
    timeout_s: float = 300.0
    """The collectives' timeout: groups made later (the checkpoint writer's) keep it."""

    @property
    def world_size(self) -> int:
        return self.layout.processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def submesh(self, name: str):
        """The 1-D mesh of one axis ("dp", "pp" or "tp") through this rank; None without a group."""
        return self.mesh[name] if self.mesh is not None else None

    def group(self, name: str):
        """The process group of one axis through this rank; None when the axis has one rank."""
        if self.mesh is None or getattr(self.layout, name) == 1:
            return None
        return self.mesh[name].get_group()


def pick_device(kind: str, local_rank: int = 0, per_process: int = 1) -> torch.device:
    """kind is auto/cuda/cpu. On CUDA a process takes the first of its ``per_process`` GPUs among
    those visible: the local rank's block (a task restricted to its own GPUs sees them from 0)."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n = torch.cuda.device_count()
    return torch.device("cuda", (local_rank * per_process) % max(n, 1))


def init_distributed(layout: Layout, device_kind: str = "auto", timeout_s: float = 300.0) -> DistState:
    """Start (or join) the process group described by the environment, and the layout's mesh.

    A layout of one process (reference, mp without dp) starts no group, unless a launcher set
    RANK (torchrun, tests): then a group of one runs the same code as a larger one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_kind, local_rank, layout.devices_per_process)
    if "RANK" not in os.environ:
        if layout.distributed:
            raise RuntimeError(
                f"the layout needs {layout.processes} processes, but no launcher set RANK/WORLD_SIZE: "
                "start it through jobs/submit.py or torchrun"
            )
        return DistState(layout, device=device)
    if world != layout.processes:
        raise RuntimeError(
            f"the launcher started {world} process(es), but the layout ({layout.describe()}) needs {layout.processes}"
        )
    # on CUDA a gloo backend serves CPU tensors beside NCCL: checkpoints' async save needs it
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistState(layout, rank, local_rank, device, backend, layout.build_mesh(device.type), timeout_s)


def rendezvous_address(host: str) -> str:
    """The IPv4 address of ``host`` (the job's first node) that every node can reach.

    Never loopback: Debian-style hosts files map a machine's own name to 127.0.1.1, so on the
    first node its own name would resolve to an address no other node can reach (the
    'head node is localhost' launcher bug). Then Slurm's NodeAddr for it is used, which is how
    the controller itself reaches the node."""
    import ipaddress
    import socket
    import subprocess

    try:
        found = sorted({a[4][0] for a in socket.getaddrinfo(host, None, socket.AF_INET)})
    except socket.gaierror:
        found = []
    usable = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    if usable:
        return usable[0]
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    m = re.search(r"NodeAddr=(\S+)", out)
    if m and m.group(1) != host:
        return rendezvous_address(m.group(1))
    raise RuntimeError(
        f"the first node {host} resolves only to {', '.join(found) or 'nothing'} on this node, which other nodes "
        f"cannot reach: give it its real address in /etc/hosts (or DNS), or set NodeAddr in slurm.conf"
    )


def route_interface(addr: str) -> str | None:
    """The network interface this node uses to reach ``addr``: ``ip route get``'s device, or, for
    an address of this very node (the route says ``lo``), the interface that holds the address."""
    import socket
    import subprocess

    try:
        out = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"\bdev (\S+)", out)
        dev = m.group(1) if m else None
        src = re.search(r"\bsrc (\S+)", out)
    except (OSError, subprocess.TimeoutExpired):  # no iproute2 (a slim container): ask the kernel directly
        dev, src = None, None
    if dev and dev != "lo":
        return dev
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # connect() on UDP sends nothing: a route lookup
        try:
            s.connect((addr, 9))
            local = s.getsockname()[0]
        except OSError:
            local = src.group(1) if src else addr
    return _interface_holding(local) or dev


def _interface_holding(ip: str) -> str | None:
    import fcntl
    import socket
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == ip and name != "lo":
            return name
    return None


def pin_network(verbose: bool = False) -> str | None:
    """Multi-node jobs: MASTER_ADDR becomes the first node's reachable address, and gloo/NCCL use
    the interface on the route to it (unless the user set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME).
    Without this gloo binds to whatever this node's hostname resolves to, which may be loopback
    or a management network. One node: nothing changes (loopback is right there). Returns a line
    saying what was chosen, or None."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    if nodes <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    host = os.environ["MASTER_ADDR"]
    addr = rendezvous_address(host)
    os.environ["MASTER_ADDR"] = addr
    iface = route_interface(addr)
    chosen = []
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if var in os.environ:
            chosen.append(f"{var}={os.environ[var]} (set by you)")
        elif iface:
            os.environ[var] = iface
            chosen.append(f"{var}={iface}")
    line = f"rendezvous on {host} = {addr}:{os.environ.get('MASTER_PORT')}; " + ", ".join(chosen)
    if verbose:
        print(line, flush=True)
    return line


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from its shards if it is a DTensor (tensor parallel), else itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_objects(obj) -> list:
    """``obj`` from every rank, in rank order, on every rank (all_gather_object: gloo and NCCL);
    ``[obj]`` without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_named(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's named CPU tensors, merged on every rank (a name held by several ranks, as in
    data parallel, keeps one copy). For --check, which is a debugging mode: it moves the whole model."""
    merged: dict[str, torch.Tensor] = {}
    for part in all_objects(tensors):
        for name, t in part.items():
            merged.setdefault(name, t)
    return merged


def worst_across(value: float, name: str) -> tuple[float, str]:
    """The largest (value, name) pair across ranks: a worst difference and what it was measured on,
    so the name reported is the one that rank actually saw, not the caller's own."""
    return max(all_objects((value, name)))


def all_max(value: float, state: DistState) -> float:
    """The largest of one float across ranks (used for check differences and timings)."""
    if state.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_floats(values: list[float], state: DistState) -> list[list[float]]:
    """Each rank's list of floats (same length on every rank), gathered everywhere."""
    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    if state.world_size == 1:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(state.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
