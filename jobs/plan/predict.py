"""The planner's cost model: one layout's step time, peak memory per device and traffic per axis.

Inputs are measured on this host where they can be: every block's forward and backward time and
activation bytes (core.parallel.block_profile) at each micro-batch size a candidate runs, profiled
once per size; link rates come from a ``--validate`` run's validate.json; on CPU, without one, a
probe among the job's own gloo processes measures what a pipeline message and an all-reduce cost
(jobs.plan.probe); what is neither is assumed per device kind, and plan.json says so. What the
run itself decides is taken from the code that decides it: the micro-batch count and stage
placement (core.parallel.balance), the cut (core.parallel.partition's time split within the memory
budget, as ``--balance time`` does) and a pipeline's step from the block costs
(``SplitPlan.predicted``), so the plan and the run cannot disagree on them.

What the model adds, per axis (communication overlaps nothing it need not, so a prediction errs
slow rather than fast):
- dp: DDP all-reduces the gradients in buckets during backward (ring: 2(d-1)/d of the bytes);
  FSDP2 all-gathers each block's weights for forward and again for backward and reduce-scatters
  its gradients, one collective per block. Both overlap backward, so a step takes forward +
  max(backward, traffic); in a pipeline the reduction waits for the last micro-batch and adds.
- pp: every micro-batch crosses each seam forward and back; on a rank's critical path that is
  2(m + stages - 1) messages of one seam's bytes, each paying the link's latency (probed on CPU:
  torch's schedule runtime and a rank's wake-up included), and one all-reduce of the loss.
- tp: compute / tp, plus two all-reduces of a block's output per block forward and two backward
  (Megatron's attention and MLP); sequence parallel moves the same bytes as all-gather and
  reduce-scatter.
Memory per device: weights, gradients and optimizer state (the model's
``optimizer_state_copies``) of the blocks it holds, sharded by tp and, under FSDP2, by dp (plus one
gathered block), and activations times the micro-batches in flight (GPipe all m, 1F1B-like the
stages after it, mp the whole batch once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from core.config import ConfigError, RunConfig
from core.data import load_dataset
from core.models import describe
from core.models.registry import build_model
from core.parallel.balance import (
    MEMORY_HEADROOM,
    SplitPlan,
    layout_microbatches,
    layout_stage_owners,
    stage_bytes_fn,
)
from core.parallel.block_profile import BlockCost, profile_blocks
from core.parallel.layout import Layout
from core.parallel.partition import balanced_split, time_split
from jobs.plan.probe import probe_link

# Link rates where nothing measured them: gloo over loopback on a busy host; NVLink-class GPUs
ASSUMED_LINKS = {"cpu": (3e-4, 1e9), "cuda": (2e-5, 100e9)}


@dataclass(frozen=True)
class Link:
    latency_s: float
    """Seconds one pipeline message costs beyond its bytes (probed: torch's runtime included)."""
    bytes_per_s: float
    source: str
    """Where the figures come from: validate.json, a probe, or 'assumed'."""
    step_latency_s: float | None = None
    """Seconds per step of a ring collective (None: latency_s); a probe measures it apart."""
    probe: dict | None = None

    def message_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    @property
    def _ring(self) -> float:
        return self.latency_s if self.step_latency_s is None else self.step_latency_s

    def all_reduce_s(self, nbytes: float, n: int) -> float:
        """Ring all-reduce over n ranks: 2(n-1) steps of 1/n of the bytes."""
        return 0.0 if n <= 1 else 2 * (n - 1) * (self._ring + nbytes / n / self.bytes_per_s)

    def gather_s(self, nbytes: float, n: int) -> float:
        """All-gather or reduce-scatter of ``nbytes`` in all over n ranks: n-1 steps of 1/n."""
        return 0.0 if n <= 1 else (n - 1) * (self._ring + nbytes / n / self.bytes_per_s)

    @property
    def latency_measured(self) -> bool:
        return self.source.startswith("probe") or self.source == "validate.json"

    def to_dict(self) -> dict:
        out = {"latency_s": self.latency_s, "bytes_per_s": self.bytes_per_s, "source": self.source}
        if self.step_latency_s is not None:
            out["collective_step_latency_s"] = self.step_latency_s
        if self.probe is not None:
            out["probe"] = self.probe
        return out


def probed_link(processes: int, message_bytes: int) -> Link:
    """The CPU link as the job's own processes would see it now (jobs.plan.probe); bandwidth assumed."""
    r = probe_link(processes, message_bytes)
    bw = ASSUMED_LINKS["cpu"][1]
    # a ring all-reduce over the probe's ranks takes 2(n-1) steps
    step = r["all_reduce_s"] / (2 * (processes - 1))
    return Link(r["message_s"], bw, f"probe: {processes} gloo processes", step, r)


def read_links(path: str | None, device_type: str) -> Link:
    """The link a layout's traffic crosses: the slowest measured in validate.json, else assumed."""
    lat, bw = ASSUMED_LINKS["cuda" if device_type == "cuda" else "cpu"]
    if path is None:
        return Link(lat, bw, "assumed")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--link-rates {path}: cannot read it ({e}): give a --validate run's validate.json") from None
    rates = [v["gbps"] for v in report.get("links", {}).values() if v.get("gbps")]
    rates += [v["allreduce_gbps"] for v in report.get("nodes", {}).values() if v.get("allreduce_gbps")]
    lats = [v["latency_ms"] / 1e3 for v in report.get("links", {}).values() if v.get("latency_ms")]
    if not rates:
        raise ConfigError(f"--link-rates {path} holds no measured bandwidth: run --validate on these nodes")
    source = "validate.json" if lats else "validate.json (latency assumed)"
    return Link(max(lats) if lats else lat, min(rates) * 1e9, source)


def target_device(cfg: RunConfig) -> torch.device:
    """The device the blocks are profiled on: this host's GPU where the run would use one."""
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def device_budget(given: float | None, device: torch.device) -> float | None:
    """Bytes one device may use: --device-memory, else the GPU's usable share; CPU: no limit."""
    if given is not None:
        return given
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory * MEMORY_HEADROOM
    return None


class Profiles:
    """Block costs on this host's device, measured once per micro-batch size."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model, cfg.flavor)
        data = load_dataset(self.model, cfg.resolved_dataset, cfg.data_dir, cfg.seed, cfg.resolved_batch_size)
        self.x, self.y = data.train.x, data.train.y
        self._costs: dict[int, list[BlockCost]] = {}
        self._seams: list[int] | None = None

    def blocks(self, rows: int) -> list[BlockCost]:
        if rows not in self._costs:
            self._costs[rows] = profile_blocks(self.model, self.x[:rows], self.y[:rows], self.device, self.cfg)
        return self._costs[rows]

    @property
    def sizes(self) -> list[int]:
        return sorted(self._costs)

    def seam_bytes(self) -> list[int]:
        """Bytes each block hands on for one sample (what crosses a cut after it)."""
        if self._seams is None:
            out, x = [], self.x[:1]
            with torch.no_grad():
                for block in self.model.blocks.values():
                    x = block(x)
                    leaves = x if isinstance(x, tuple) else (x,)
                    out.append(sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor)))
            self._seams = out
        return self._seams

    def tokens_per_sample(self) -> int | None:
        """Token models (integer inputs): tokens in one sample, for tokens per second."""
        return int(self.x[0].numel()) if not self.x.is_floating_point() else None


@dataclass
class Prediction:
    step_s: float | None = None
    peak_bytes: float | None = None
    memory: dict = field(default_factory=dict)
    """Bytes on the fullest device: weights, gradients, optimizer, activations."""
    communication: dict = field(default_factory=dict)
    """Bytes per step and seconds on the critical path, per axis."""
    split: list[int] | None = None
    microbatches: int = 1
    fits: bool = True
    excluded_because: str | None = None


def _memory(blocks: list[BlockCost], copies: int, held: int, shard: float, gathered: float = 0.0) -> dict:
    """Bytes of the blocks one device holds: weights and gradients (``shard`` of them: 1/tp, under
    FSDP2 also 1/dp, plus ``gathered`` bytes of unsharded weights), optimizer copies, activations."""
    params = sum(b.param_bytes for b in blocks)
    acts = sum(b.activation_bytes for b in blocks) * held
    return {
        "weights": params * shard + gathered,
        "gradients": params * shard + gathered,
        "optimizer": params * shard * copies,
        "activations": acts,
    }


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def predict(cfg: RunConfig, layout: Layout, profiles: Profiles, link: Link, budget: float | None) -> Prediction:
    """What ``cfg`` (already validated into ``layout``) would take per step and per device."""
    copies = describe(cfg.model, cfg.flavor).optimizer_state_copies()
    dp, tp, n = layout.dp, layout.tp, layout.stages
    local = layout.local_batch(cfg.resolved_batch_size)
    m = layout_microbatches(cfg, layout)
    rows = local // m
    costs = profiles.blocks(rows)
    seams = [s * rows for s in profiles.seam_bytes()]
    fsdp = dp > 1 and layout.dp_mode == "fsdp"
    out = Prediction(microbatches=m)
    comm: dict = {}

    if cfg.strategy in ("mp", "pp"):
        times = [b.time_s / tp for b in costs]
        capacity = None if budget is None else budget / layout.stages_per_rank
        try:
            split = time_split(times, n, stage_bytes_fn(cfg, layout, costs, m), capacity)
        except ValueError:
            out.fits, out.excluded_because = False, "no split of the blocks fits the memory budget"
            split = balanced_split([b.param_bytes for b in costs], n)
        out.split = split
        starts = [sum(split[:i]) for i in range(n)]
        stage_costs = [costs[s : s + k] for s, k in zip(starts, split)]
        owners = layout_stage_owners(cfg, layout)
        scaled = [
            BlockCost(b.name, b.forward_s / tp, b.backward_s / tp, b.activation_bytes, b.param_bytes) for b in costs
        ]
        plan = SplitPlan("time", split, split, m, rows, str(profiles.device), scaled, owners, capacity)
        step = plan.predicted()["step_time_s"]
        if cfg.strategy == "pp":
            seam = max((seams[s + k - 1] for s, k in zip(starts[:-1], split[:-1])), default=0)
            comm["pp"] = {"bytes": 2 * m * sum(seams[s + k - 1] for s, k in zip(starts[:-1], split[:-1]))}
            # the messages on the critical path, and the loss every rank reports (one all-reduce)
            comm["pp"]["seconds"] = 2 * (m + n - 1) * link.message_s(seam) + link.all_reduce_s(4, layout.pp)
            held = [m if cfg.schedule == "gpipe" else min(m, n - s) for s in range(n)]
        else:  # mp: one process runs its stages in turn; a seam is a device-to-device copy
            held = [1] * n
            crossing = sum(seams[s + k - 1] for s, k in zip(starts[:-1], split[:-1]))
            comm["mp"] = {
                "bytes": 2 * crossing,
                "seconds": 0.0 if profiles.device.type == "cpu" else 2 * crossing / link.bytes_per_s,
            }
        per_rank: dict[int, dict] = {}
        for stage, (blocks, h) in enumerate(zip(stage_costs, held)):
            shard = 1 / tp / (dp if fsdp else 1)
            gathered = max((b.param_bytes for b in blocks), default=0) / tp if fsdp else 0.0
            mem = _memory(blocks, copies, h, shard, gathered)
            mem["activations"] /= tp
            per_rank[owners[stage]] = _add(per_rank.get(owners[stage], {}), mem)
        fullest = max(per_rank.values(), key=lambda d: sum(d.values()))
        rank_params = max(
            sum(b.param_bytes for s, blocks in enumerate(stage_costs) if owners[s] == r for b in blocks) / tp
            for r in per_rank
        )
        dp_s = 0.0
        if dp > 1:  # the pipeline reduces gradients once, after its last micro-batch: nothing to hide behind
            if fsdp:  # each block is its own FSDP2 group: gathered once, its gradients reduce-scattered once
                dp_s = max(
                    sum(
                        3 * link.gather_s(b.param_bytes / tp, dp)
                        for s, bs in enumerate(stage_costs)
                        if owners[s] == r
                        for b in bs
                    )
                    for r in per_rank
                )
            else:
                dp_s = link.all_reduce_s(rank_params, dp)
            dp_s += link.all_reduce_s(4, dp)  # the global batch's mean loss
            comm["dp"] = {"bytes": (3 if fsdp else 2) * rank_params, "seconds": dp_s}
        if tp > 1:
            comm["tp"] = _tp_traffic(seams, link, tp, m * max(len(b) for b in stage_costs) / len(costs), cfg)
        out.step_s = step + sum(c["seconds"] for c in comm.values())
        out.memory = fullest
    else:  # reference, dp, tp: the whole model on every rank, a 1/tp share of each block under tp
        fwd = sum(b.forward_s for b in costs) / tp
        bwd = sum(b.backward_s for b in costs) / tp
        params = sum(b.param_bytes for b in costs) / tp
        shard = 1 / tp / (dp if fsdp else 1)
        gathered = max(b.param_bytes for b in costs) / tp if fsdp else 0.0
        out.memory = _memory(costs, copies, 1, shard, gathered)
        out.memory["activations"] /= tp
        tp_s = 0.0
        if tp > 1:
            comm["tp"] = _tp_traffic(seams, link, tp, 1, cfg)
            tp_s = comm["tp"]["seconds"]
        dp_s = 0.0
        if dp > 1:
            if fsdp:
                dp_s = sum(3 * link.gather_s(b.param_bytes / tp, dp) for b in costs)
            else:
                dp_s = link.all_reduce_s(params, dp)
            dp_s += link.all_reduce_s(4, dp)  # the global batch's mean loss
            comm["dp"] = {"bytes": (3 if fsdp else 2) * params, "seconds": dp_s}
        out.step_s = fwd + max(bwd, dp_s) + tp_s
    out.communication = comm
    out.peak_bytes = sum(out.memory.values())
    if budget is not None and out.peak_bytes > budget and out.fits:
        out.fits = False
        out.excluded_because = f"needs {_mib(out.peak_bytes)} per device, over the budget of {_mib(budget)}"
    return out


def _tp_traffic(seams: list[int], link: Link, tp: int, share: float, cfg: RunConfig) -> dict:
    """Two all-reduces of a block's output forward and two backward, for each block a rank runs
    (``share`` of the model, times its micro-batches)."""
    per_block = [4 * link.all_reduce_s(s, tp) for s in seams]
    return {"bytes": 4 * 2 * sum(seams) * share, "seconds": sum(per_block) * share}


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"
