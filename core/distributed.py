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


@dataclass
class DistState:
    """Everything a strategy needs to know about where it runs; passed as an argument, never global."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    pp: int = 1
    tp: int = 1
    mesh: object | None = None
    """DeviceMesh with dimensions ("pp", "tp") when world_size > 1."""

    def __post_init__(self) -> None:
        if self.pp * self.tp != self.world_size:
            raise ValueError(f"pp {self.pp} x tp {self.tp} != world size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def submesh(self, name: str):
        return self.mesh[name] if self.mesh is not None else None


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    """kind is auto/cuda/cpu; on CUDA each process takes its local rank's GPU among those visible."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n = torch.cuda.device_count()
    return torch.device("cuda", local_rank % max(n, 1))


def init_distributed(device_kind: str = "auto", tp: int = 1, timeout_s: float = 300.0) -> DistState:
    """Start (or join) the process group described by the environment; one process if none is.

    A launcher that sets RANK gets a group even of size 1, so TP degree 1 runs the same code.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_kind, local_rank)
    if "RANK" not in os.environ:  # plain single process: no group (reference, mp)
        return DistState(device=device)
    if world % tp:
        raise ValueError(f"world size {world} is not a multiple of tp {tp}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("pp", "tp"))
    return DistState(rank, world, local_rank, device, backend, world // tp, tp, mesh)


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
