"""The one training loop. A style supplies only ``build`` (core.training.strategy.Built); the rest is here.

Per optimizer step: ``grad_accum`` batches through ``built.step`` (forward + backward), gradients
divided by ``grad_accum`` (so k accumulated batches equal one k-times batch), the optional parity
check, the optimizer step. Losses stay on the device until a progress line needs them: no host
sync per step on GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
from torch import nn

from core.check import metrics
from core.check.reference import ParityChecker
from core.config import RunConfig
from core.data import Dataset, Split, batches, load_dataset, steps_per_epoch
from core.models import build_model, describe
from core.models.base import BlockModel, to_block_names
from core.models.randomness import switch_off_randomness
from core.parallel.balance import plan_for_run
from core.parallel.data_parallel import dp_bytes_per_step, mean_over_dp, sync_buffers
from core.parallel.distributed import DistState, all_gather_floats
from core.report.curves import Scalars, save_curves_png
from core.report.live import LiveReport
from core.training import faults, progress
from core.training.checkpoint import Checkpointer
from core.training.stop import StopRequest
from core.training.strategy import Built

BuildFn = Callable[[nn.Module, RunConfig, DistState], Built]


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter], model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The model's optimizer (``model.optimizer``: SGD unless it says otherwise, AdamW for gpt) at
    --lr; fused kernels on CUDA where the model allows them (``"fused": True``).

    All DTensors on one mesh step fused like plain tensors: FSDP2's, and tensor parallel's when the
    plan makes every parameter a DTensor (gpt's does: ``core.models.tp_styles.ReplicateParallel`` for the norms
    and the position embedding; AdamW's host time measured 81-288 ms tensor by tensor
    against 9-48 ms fused on 2 H200s). A mix of DTensors and plain tensors (a plan that leaves some
    layers plain, as mnist-cnn's convolutions) makes the multi-tensor kernels refuse the list on
    CUDA: such runs step tensor by tensor.
    """
    # all DTensors on one mesh (FSDP2, a tp plan covering every layer) step like plain tensors,
    # fused or foreach; a mix (replicated plain layers beside sharded matrices) steps tensor by tensor
    one_kind = not _has_dtensor(params) or (
        all(_is_dtensor(p) for p in params) and len({p.device_mesh for p in params}) == 1
    )
    fused = bool(params) and all(p.device.type == "cuda" for p in params) and one_kind
    foreach = None if one_kind else False
    cls, kwargs = (model if model is not None else describe(cfg.model, cfg.flavor)).optimizer
    kwargs = dict(kwargs)
    if kwargs.pop("fused", False):
        kwargs["fused"] = fused or None
    # a stage may hold no parameters (mnist-cnn's pool block alone, a split --balance time can
    # choose): torch refuses an empty list but not an empty group, which steps as a no-op
    return cls(params or [{"params": []}], lr=cfg.resolved_lr, foreach=foreach, **kwargs)


def _is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "full_tensor")


def _has_dtensor(params: list[nn.Parameter]) -> bool:
    return any(_is_dtensor(p) for p in params)


def set_numerics(cfg: RunConfig) -> None:
    # fp32 means fp32: TF32 would make matmuls differ from the reference by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = cfg.check


def log(state: DistState, msg: str) -> None:
    if state.is_main:
        print(msg, flush=True)


def total_steps(cfg: RunConfig, train: Split) -> int:
    per_epoch = steps_per_epoch(train, cfg.resolved_batch_size) // cfg.grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"--batch-size {cfg.resolved_batch_size} x --grad-accum {cfg.grad_accum} is more than "
            f"the {len(train)} training samples"
        )
    return cfg.steps if cfg.steps is not None else cfg.resolved_epochs * per_epoch


def load_initial_weights(model: BlockModel, path: str) -> None:
    """``--init-from``: a state dict in the block model's names or the uncut model's (an export).
    Buffers may be missing (exports of older versions held parameters only): they keep their
    initial values; every parameter must be there (checked on the submitting host, jobs.plan)."""
    state = to_block_names(model, torch.load(path, map_location="cpu", weights_only=True))
    missing = model.load_state_dict(state, strict=False).missing_keys
    params = {n for n, _ in model.named_parameters()}
    assert not params & set(missing), f"--init-from {path} lacks parameters {sorted(params & set(missing))[:3]}"


class Preempted(RuntimeError):
    """Training stopped at a step boundary on request (SIGUSR2) after saving a checkpoint."""


def run(
    cfg: RunConfig,
    state: DistState,
    build: BuildFn,
    out_dir: str | None = None,
    dataset: Dataset | None = None,
    stop: StopRequest | None = None,
    style_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> dict:
    """Train, evaluate, write result.json (rank 0) into out_dir; return the result on every rank.

    With out_dir, a checkpoint found there is resumed exactly; with ``stop``, a SIGUSR2 makes the
    loop save a checkpoint at the next agreed step boundary and raise Preempted. ``style_optimizer``
    replaces the style's optimizer only (never the --check reference's): tests give it a wrong one."""
    set_numerics(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.flavor, dropout=not cfg.check)
    if cfg.init_from:  # checked against the model on the submitting host (jobs.plan)
        load_initial_weights(model, cfg.init_from)
    bs = cfg.resolved_batch_size
    data = dataset or load_dataset(model, cfg.resolved_dataset, cfg.data_dir, cfg.seed, bs)
    log(state, f"data: {data.description}")
    switched_off = switch_off_randomness(model, data.train.x[:2]) if cfg.check else []
    log(state, state.layout.describe())
    shard = state.layout.shard(state.rank, bs)  # this replica's rows of every global batch

    make_opt = lambda params: make_optimizer(cfg, params, model)
    classifier = model.classifier  # read before a style cuts the model
    checker = ParityChecker(model, cfg, state, make_opt) if cfg.check else None  # copies weights first
    # the cut (mp, pp): measured before compiling, so compilation is not what is timed
    plan = plan_for_run(model, cfg, state, data.train.x, data.train.y)
    if plan is not None:
        log(state, plan.describe())
    if cfg.compile:
        for block in model.blocks.values():
            block.compile()  # in place: parameter names and the block seams stay as they are
    # the styles cut where the plan says (cfg.split); the stored configuration keeps what was asked
    built = build(model, cfg if plan is None else dataclasses.replace(cfg, split=plan.split), state)
    opt = (style_optimizer or make_opt)([p for _, p in built.params])
    train = data.train.head(cfg.train_samples).to(built.input_device)
    n_steps = total_steps(cfg, train)
    if cfg.check:
        off = f"switched off {', '.join(switched_off)}" if switched_off else "no random layers found"
        log(state, f"check: {off}; comparing every step's loss, gradients, updates and buffers with one device")

    losses: list[torch.Tensor] = []
    prior_losses: list[float] = []
    step, epoch, skip = 0, 0, 0
    ckpt = Checkpointer(out_dir, state, keep=cfg.keep_checkpoints, log=lambda m: log(state, m)) if out_dir else None
    # on GPU a periodic save writes in the background (a writer thread; its collectives go through
    # a gloo group of its own); on CPU the copy would cost what the write costs
    background_saves = state.device.type == "cuda"
    if ckpt and ckpt.exists():
        position, prior_losses, meta = ckpt.load(built.params, opt, built.buffers)
        if checker:  # the reference continues from the restored weights, buffers and AdamW state, all of them
            ckpt.load_state(checker.ref.params, checker.opt, buffers=checker.ref.buffers)
        step, epoch, skip = position["step"], position["epoch"], position["batch"]
        saved = meta["layout"]
        was = (
            ""
            if saved == state.layout.to_dict()
            else f", saved under {saved['strategy']} dp {saved['dp']} pp {saved['pp']} tp {saved['tp']}"
        )
        log(
            state,
            f"resumed from {ckpt.dir} at step {step} (epoch {epoch + 1}, batch {skip}{was}); "
            f"loading took {ckpt.load_s:.2f} s",
        )
    tracker = progress.current()  # what this rank is doing, for a hang report (core/training/progress.py)
    # ranks agree on a stop with one all-reduce: every step alone, every 10 steps in a group
    stop_every = 1 if state.world_size == 1 else 10
    built.train_mode(True)
    metrics.reset_peak_memory(built.devices)
    clock = metrics.Stopwatch(built.devices)
    # steady-state throughput leaves out the first steps (allocator warm-up, compilation, shape inference)
    warm = 4 if n_steps > 8 else 0  # after the recorded timeline steps (core.report.timeline)
    t_warm = clock.t0
    scalars = Scalars(out_dir, state.is_main)
    tokens = train.x.shape[1] if train.x.dim() == 2 and not train.x.is_floating_point() else None  # token ids
    live = LiveReport(lambda msg: log(state, msg), scalars, n_steps, step, bs * cfg.grad_accum, tokens, cfg.log_every)
    micro, batch_losses, replica_batch = 0, [], None
    while step < n_steps:
        for index, (x, y) in enumerate(batches(train, bs, cfg.seed, epoch)):
            if index < skip:  # batches this run saw before its checkpoint
                continue
            if micro == 0:
                if tracker is not None:
                    tracker.step = step + 1
                faults.maybe_hang(state.rank, step + 1)  # tests only (core/training/faults.py)
                if tracker is not None:
                    tracker.note(f"step {step + 1}: forward and backward")
            y = y.to(built.target_device, non_blocking=True)
            x_local, y_local = x[shard], y[shard]
            replica_batch = len(x_local)
            batch_losses.append(mean_over_dp(built.step(x_local, y_local), state))
            if checker:
                checker.micro_step(x, y, built.microbatches)
            micro += 1
            if micro < cfg.grad_accum:
                continue
            if cfg.grad_accum > 1:
                for _, p in built.params:
                    if p.grad is not None:
                        p.grad.div_(cfg.grad_accum)
            loss = batch_losses[0] if len(batch_losses) == 1 else torch.stack(batch_losses).mean()
            if checker:
                checker.compare(float(loss.item()), built, cfg.grad_accum)
            if tracker is not None:
                tracker.note(f"step {step + 1}: optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync_buffers(built.buffers, state)  # replicas keep equal buffers (dp rank 0's, as DDP does)
            if checker:
                checker.sync_weights(built)
            losses.append(loss)
            built.after_step(step)
            micro, batch_losses = 0, []
            step += 1
            if step == warm:
                t_warm = clock.now()
            live.step_done(step, epoch, loss)
            faults.maybe_fail(state.rank, step)  # tests only (core/training/faults.py)
            # every N steps, and the last step so a finished run can be continued; and on SIGUSR2
            periodic = ckpt and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step >= n_steps)
            stopping = step < n_steps and stop is not None and step % stop_every == 0 and stop.agreed(state) and ckpt
            if periodic or stopping:
                position = {"step": step, "epoch": epoch, "batch": index + 1}
                done = prior_losses + [float(v) for v in losses]
                # a stop must be on disk before the job ends: no background write then
                ckpt.save(
                    built.params,
                    opt,
                    position,
                    done,
                    cfg.to_dict(),
                    background_saves and not stopping,
                    buffers=built.buffers,
                )
                log(state, f"checkpoint at step {step} saved in {ckpt.dir}")
            if step >= n_steps:
                break
            if stopping:
                log(state, f"stop requested: checkpoint at step {step} saved in {ckpt.dir}")
                raise Preempted(f"checkpoint at step {step} in {ckpt.dir}")
        epoch, skip = epoch + 1, 0
    if ckpt:
        ckpt.finish()  # a background save in flight is complete and published before the result
    train_time = clock.elapsed()
    loss_values = prior_losses + ([float(v) for v in torch.stack(losses).float().cpu()] if losses else [])

    eval_acc, eval_n = evaluate(cfg, built, data.test if classifier else None, state)
    peaks, peak_kind = metrics.peak_memory_bytes(built.devices)
    per_rank_peaks = all_gather_floats([float(max(peaks))], state) if state.world_size > 1 else [[p] for p in peaks]
    result = {
        "strategy": cfg.strategy,
        "model": cfg.model,
        "flavor": cfg.flavor,
        "dataset": cfg.resolved_dataset,
        "data_source": data.description,
        "world_size": state.world_size,
        "nodes": cfg.nodes,
        "layout": state.layout.to_dict(),
        "replica_batch": replica_batch,  # rows each data-parallel replica trained on per batch
        "device": str(built.input_device.type),
        "devices": [str(d) for d in built.devices],
        "torch_version": torch.__version__,
        "config": cfg.to_dict(),
        "steps": len(loss_values),
        "losses": loss_values,
        "final_loss": loss_values[-1],
        "eval_accuracy": eval_acc,
        "eval_samples": eval_n,
        "train_time_s": train_time,
        "samples_per_sec": len(losses) * bs * cfg.grad_accum / train_time,  # this attempt's steps
        "steady_samples_per_sec": (len(losses) - warm) * bs * cfg.grad_accum / (clock.t0 + train_time - t_warm),
        "steady_after_steps": warm,
        "peak_memory_bytes": [int(r[0]) for r in per_rank_peaks],
        "peak_memory_kind": peak_kind,
        "attempts": faults.attempt() + 1,  # > 1: requeued after a preemption or a failure (Slurm)
    }
    result.update(built.result_extras())
    if plan is not None:  # predicted per-stage busy time and bubble beside the measured ones
        result["balance"] = plan.report(result)
    result["communication_per_axis"] = communication_per_axis(result, built, state)
    if checker:
        result["check"] = checker.summary.to_dict()
    if ckpt and (ckpt.load_s is not None or cfg.checkpoint_every):
        result["checkpoints"] = ckpt.summary()  # what --checkpoint-every cost this run
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        built.save_artifacts(out_dir)
        scalars.finish(result)
        if state.is_main:
            metrics.write_json_atomic(os.path.join(out_dir, "result.json"), result)
            save_curves_png(result, os.path.join(out_dir, "curves.png"))
    return result


def communication_per_axis(result: dict, built: Built, state: DistState) -> dict:
    """What each axis moves per step: dp by construction of its mode (core.parallel.data_parallel), pp's
    activation sends as recorded by the pipeline, tp's collectives as counted on the first step."""
    out = {}
    if state.layout.dp > 1:
        out["dp"] = dp_bytes_per_step(built.params, state)
    if "p2p_bytes_per_step" in result:
        out["pp"] = result["p2p_bytes_per_step"]
    if "communication_first_step" in result:
        out["tp"] = result["communication_first_step"]
    return out


@torch.no_grad()
def evaluate(cfg: RunConfig, built: Built, test: Split | None, state: DistState) -> tuple[float | None, int]:
    """Classification accuracy on held-out data (classifiers; the caller passes None otherwise)."""
    if test is None:
        return None, 0
    test = test.head(cfg.eval_samples)
    bs = cfg.resolved_batch_size
    shard = state.layout.shard(state.rank, bs)  # each replica scores its rows of each batch
    built.train_mode(False)
    correct = torch.zeros((), dtype=torch.long, device=built.target_device)
    scored = False
    for start in range(0, len(test), bs):
        x, y = test.x[start : start + bs], test.y[start : start + bs]
        n = len(x)
        if n < bs:  # pad the tail: pipelines need whole batches; padded rows are not scored
            x = torch.cat([x, x.new_zeros((bs - n, *x.shape[1:]))])
            y = torch.cat([y, y.new_zeros((bs - n, *y.shape[1:]))])
        real = (torch.arange(bs) < n)[shard]
        x, y = x[shard].to(built.input_device), y[shard].to(built.target_device)
        out = built.predict(x, y)
        if out is not None:
            scored = True
            hits = (out.argmax(dim=1) == y.to(out.device)) & real.to(out.device)
            correct += hits.sum().to(correct.device)
    built.train_mode(True)
    # only a pipeline's last stage holds outputs (and every tensor rank holds the same): per
    # replica the largest count is the true one; replicas scored different rows, so they add up
    total = all_gather_floats([float(correct.item()), float(scored), float(state.dp_rank)], state)
    per_replica: dict[int, float] = {}
    for count, was_scored, replica in total:
        if was_scored:
            per_replica[int(replica)] = max(per_replica.get(int(replica), 0.0), count)
    if not per_replica:
        return None, 0  # the style could not run forward-only (see pp.pipeline.NO_EVAL)
    return sum(per_replica.values()) / len(test), len(test)
