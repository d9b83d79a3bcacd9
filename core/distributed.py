"""One way to start a process group, from torchrun, Slurm/submitit or a local launcher.

``init_distributed`` reads the standard env:// variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), which torchrun sets and ``submitit.helpers.TorchDistributedEnvironment``
exports; with none of them it is a single process and starts no group. NCCL on CUDA, gloo on CPU,
and a timeout on every collective: minutes by default, never torch's 30-minute default, so a dead
rank fails the job instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from core.layout import Layout


@dataclass
class DistState:
    """Where this process runs in the layout; passed as an argument, never global.

    Every degree comes from ``layout`` (core.layout.Layout); this object adds only what the
    launcher decided: the rank, the device, the backend and the mesh built from the layout."""

    layout: Layout
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: object | None = None
    """DeviceMesh with dimensions ("dp", "pp", "tp") when the layout has more than one process."""

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
    return DistState(layout, rank, local_rank, device, backend, layout.build_mesh(device.type))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from its shards if it is a DTensor (tensor parallel), else itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
