"""The parallel layout: the one owner of every degree (dp, pp, tp), stage count and process shape.

torchtitan's ``ParallelDims`` is the model: the configuration says what the user asked for
(strategy, --gpus, --dp, --tp, --nodes), ``Layout.from_config`` derives everything else ONCE,
validates it once with one clear line, and the result is passed as an argument to whoever needs
it (the launch plan, the executor, the task, the process group, the styles). Nothing else in the
code base derives a degree.

Rank order is dp-major, tp-minor: rank = (dp_rank * pp + pp_rank) * tp + tp_rank. Consecutive
ranks share a tensor group, and Slurm and the local executor number tasks node by node, so a
tensor group never spans nodes as long as each node holds a multiple of tp processes (checked).

    strategy   processes      devices per process   devices (--gpus)
    reference  1              1                      1
    dp         dp             1                      dp
    mp         dp             stages                 dp x stages
    pp         dp x pp x tp   1                      dp x pp x tp
    tp         dp x tp        1                      dp x tp
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import DP_MODES, ConfigError, RunConfig
from core.parallel.pipeline_schedules import SCHEDULES


@dataclass(frozen=True)
class Layout:
    strategy: str
    dp: int
    """Data-parallel replicas; each takes its shard of every global batch."""
    pp: int
    """Pipeline ranks per replica (pp); 1 for every other style."""
    tp: int
    """Tensor-parallel ranks per stage (tp, and pp x tp); 1 otherwise."""
    stages: int
    """Pieces the model is cut into per replica: mp devices, pp ranks x stages per rank, else 1."""
    stages_per_rank: int
    """pp: model chunks each pipeline rank holds (2 for interleaved and V schedules); else 1."""
    nodes: int
    dp_mode: str
    """How replicas keep gradients equal: fsdp (FSDP2 fully_shard) or ddp (DistributedDataParallel)."""

    # ---- derived --------------------------------------------------------------------------
    @property
    def processes(self) -> int:
        """Ranks of the job: one per device, except mp, where one process drives a replica's devices."""
        return self.dp * self.pp * self.tp

    @property
    def devices_per_process(self) -> int:
        return self.stages if self.strategy == "mp" else 1

    @property
    def devices(self) -> int:
        """GPUs of the whole job (``--gpus``)."""
        return self.processes * self.devices_per_process

    @property
    def processes_per_node(self) -> int:
        return self.processes // self.nodes

    @property
    def gpus_per_node(self) -> int:
        return self.devices // self.nodes

    @property
    def distributed(self) -> bool:
        """More than one process: a process group and a mesh are needed."""
        return self.processes > 1

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of a global rank (tp innermost: see the module docstring)."""
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def local_batch(self, global_batch: int) -> int:
        """Samples each data-parallel replica takes of one global batch."""
        return global_batch // self.dp

    def shard(self, rank: int, global_batch: int) -> slice:
        """Rows of the global batch that ``rank``'s replica trains on (contiguous, equal shards)."""
        b = self.local_batch(global_batch)
        d = self.coords(rank)[0]
        return slice(d * b, (d + 1) * b)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "dp": self.dp,
            "pp": self.pp,
            "tp": self.tp,
            "stages": self.stages,
            "stages_per_rank": self.stages_per_rank,
            "processes": self.processes,
            "devices": self.devices,
            "nodes": self.nodes,
            "processes_per_node": self.processes_per_node,
            "gpus_per_task": self.devices_per_process,
            "dp_mode": self.dp_mode if self.dp > 1 else None,
        }

    def describe(self) -> str:
        """One line for the start of a run: what runs where."""
        axes = " x ".join(f"{k} {v}" for k, v in (("dp", self.dp), ("pp", self.pp), ("tp", self.tp)) if v > 1)
        axes = axes or "one replica"
        what = f"{self.stages} stages per process" if self.strategy == "mp" else f"{self.processes} process(es)"
        dp = f", replicas kept equal by {self.dp_mode}" if self.dp > 1 else ""
        return f"layout: {self.strategy}, {axes}: {what}, {self.devices} device(s) on {self.nodes} node(s){dp}"

    def build_mesh(self, device_type: str):
        """The DeviceMesh ("dp", "pp", "tp") of this layout; call on every rank of the group."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.dp, self.pp, self.tp), mesh_dim_names=("dp", "pp", "tp"))

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: RunConfig) -> Layout:
        """Derive and validate the layout; ConfigError (one line) for the first impossible request."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        s, gpus, nodes = cfg.strategy, cfg.gpus, cfg.nodes
        need(gpus >= 1, f"--gpus must be at least 1 (got {gpus})")
        need(nodes >= 1, f"--nodes must be at least 1 (got {nodes})")
        need(cfg.tp >= 1, f"--tp must be at least 1 (got {cfg.tp})")
        need(cfg.dp is None or cfg.dp >= 1, f"--dp must be at least 1 (got {cfg.dp})")
        dp = cfg.dp or (gpus if s == "dp" else 1)
        tp, pp, stages, per_rank = 1, 1, 1, 1
        need(gpus % dp == 0, f"--gpus {gpus} is the total of all replicas: it must be a multiple of --dp {dp}")
        per_replica = gpus // dp
        if s == "reference":
            need(
                gpus == 1 and dp == 1,
                "--strategy reference runs on one device: use --gpus 1 (--strategy dp for data parallel)",
            )
        elif s == "dp":
            need(dp == gpus, f"--strategy dp puts one whole model on each device: --dp {dp} must equal --gpus {gpus}")
        elif s == "mp":
            stages = per_replica
        elif s == "tp":
            tp = per_replica
            need(
                cfg.tp in (1, tp),
                f"--strategy tp splits each replica over --gpus / --dp = {tp} ranks: drop --tp or set --tp {tp}",
            )
        elif s == "pp":
            tp = cfg.tp
            need(
                per_replica % tp == 0,
                f"--gpus {gpus} is dp x pp x tp: it must be a multiple of --dp {dp} x --tp {tp} = {dp * tp}",
            )
            pp = per_replica // tp
            per_rank = SCHEDULES[cfg.schedule].stages_per_rank if cfg.schedule in SCHEDULES else 1
            stages = pp * per_rank
        if s not in ("pp", "tp"):
            need(cfg.tp == 1, "--tp applies to --strategy tp and pp")
        # ddp measured faster (core/parallel/data_parallel.py); FSDP2 is the one that holds DTensor (tp) parameters
        mode = cfg.dp_mode or ("fsdp" if tp > 1 else "ddp")
        need(mode in DP_MODES, f"unknown --dp-mode {mode!r}: choose one of {', '.join(DP_MODES)}")
        need(
            not (mode == "ddp" and tp > 1),
            "--dp-mode ddp cannot hold tensor-parallel (DTensor) parameters: use --dp-mode fsdp with --tp",
        )
        need(
            not (mode == "fsdp" and s == "mp" and dp > 1),
            "--strategy mp keeps a replica's stages on several devices in one process, which FSDP2 cannot "
            "shard: use --dp-mode ddp (the default without --tp)",
        )
        layout = cls(s, dp, pp, tp, stages, per_rank, nodes, mode)
        procs = layout.processes
        need(
            procs % nodes == 0,
            f"--nodes {nodes} does not divide the layout's {procs} process(es) ({layout._axes()}): "
            f"pick --nodes from {_divisors(procs)}",
        )
        need(
            layout.processes_per_node % tp == 0,
            f"--nodes {nodes} would split tensor groups of {tp} across nodes ({layout.processes_per_node} "
            f"process(es) per node): pick --nodes so each node holds a multiple of {tp}",
        )
        return layout

    def _axes(self) -> str:
        return f"dp {self.dp} x pp {self.pp} x tp {self.tp}"

    def check_batch(self, global_batch: int) -> None:
        """The global batch must cut into equal replica shards (pp.validate checks the micro-batches)."""
        if global_batch % self.dp:
            raise ConfigError(
                f"--batch-size {global_batch} does not split into {self.dp} equal data-parallel shards: "
                f"use a multiple of --dp {self.dp}"
            )


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
