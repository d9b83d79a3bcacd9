"""Tensor (intra-layer) parallelism: Megatron's column/row splits as a plan, applied by DTensor.

The plan is data: a dict from module names to torch.distributed.tensor.parallel styles.

Between blocks the activations are REPLICATED (every TP rank holds the whole (B, T, d) tensor),
or, with sequence parallel, SHARDED ON THE SEQUENCE DIM (Shard(1)): each rank holds T/tp rows.

Inside a transformer layer (Megatron-LM, Shoeybi et al. 2019):
  attention: q, k, v column-split (each rank computes heads/tp heads), o row-split;
  MLP:       up column-split (each rank holds 4d/tp hidden units), down row-split.
A column-split matmul needs its input whole and leaves its output split; the row-split matmul
that follows consumes the split and produces partial sums: ONE all-reduce joins them. So each
layer costs two all-reduces in forward (after o, after down) and two in backward (the gradient of
the layer input of attention and of the MLP). Sequence parallel turns each all-reduce into a
reduce-scatter plus an all-gather of the same total volume, and shards the norms' work.

``attn`` and ``mlp`` take their input as one replicated DTensor (PrepareModuleInput with
use_local_output=False) so that q, k and v share it: their three partial input gradients add up
before the single backward all-reduce instead of costing three.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from core.config import ConfigError, RunConfig
from core.layout import Layout
from core.models import BlockModel, count_blocks
from core.models.gpt import GPT_FLAVORS


def gpt_layer_plan(prefix: str, sequence_parallel: bool) -> dict:
    """One transformer layer: attention heads and MLP hidden units split over the TP ranks."""
    between = Shard(1) if sequence_parallel else Replicate()  # layout of activations between blocks
    plan = {
        f"{prefix}.attn": PrepareModuleInput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        f"{prefix}.attn.q": ColwiseParallel(),
        f"{prefix}.attn.k": ColwiseParallel(),
        f"{prefix}.attn.v": ColwiseParallel(),
        # with sequence parallel the residual stream stays a DTensor (Shard(1)) between blocks
        f"{prefix}.attn.o": RowwiseParallel(output_layouts=between, use_local_output=not sequence_parallel),
        f"{prefix}.mlp": PrepareModuleInput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        f"{prefix}.mlp.up": ColwiseParallel(),
        f"{prefix}.mlp.down": RowwiseParallel(output_layouts=between, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        plan[f"{prefix}.ln1"] = SequenceParallel()
        plan[f"{prefix}.ln2"] = SequenceParallel()
    return plan


def gpt_plan(model: BlockModel, sequence_parallel: bool, loss_parallel: bool) -> dict:
    layers = [n for n in model.blocks if n.startswith("h")]
    plan: dict = {}
    if "embed" in model.blocks:
        # vocabulary-parallel embedding: each rank looks up its slice of the vocabulary, the partial
        # embeddings are summed (all-reduce, or reduce-scatter straight into the sequence shards)
        plan["blocks.embed.tok"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate(), use_local_output=True
        )
    if sequence_parallel and layers:
        # the first layer receives the replicated embedding and keeps only its sequence shard
        plan[f"blocks.{layers[0]}"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),)
        )
    for name in layers:
        plan.update(gpt_layer_plan(f"blocks.{name}", sequence_parallel))
    if "head" in model.blocks:
        if sequence_parallel:
            plan["blocks.head.norm"] = SequenceParallel()
        # the head is column-split over the vocabulary; with loss parallel the logits stay sharded
        # (Shard(-1)) and cross-entropy reduces across ranks instead of gathering (B, T, vocab)
        plan["blocks.head.out"] = ColwiseParallel(
            input_layouts=Shard(1) if sequence_parallel else Replicate(),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    return plan


def mnist_plan(model: BlockModel) -> dict:
    """The notebook's picture: Linear(9216,128) split by columns (y = [X A_0, X A_1]), then
    Linear(128,20) split by rows so one all-reduce joins the halves. The convolutions stay
    replicated: their weights are 0.3% of the parameters and splitting them saves nothing."""
    plan = {}
    if "fc1" in model.blocks:
        plan["blocks.fc1"] = ColwiseParallel()
    if "fc2" in model.blocks:
        plan["blocks.fc2"] = RowwiseParallel()
    return plan


def tp_plan(model: BlockModel, cfg: RunConfig) -> dict:
    if cfg.model == "gpt":
        return gpt_plan(model, cfg.sequence_parallel, cfg.loss_parallel)
    if cfg.model == "mnist-cnn":
        return mnist_plan(model)
    return {}


def apply_tp(model: BlockModel, tp_mesh, cfg: RunConfig) -> BlockModel:
    """Shard the model's layers over ``tp_mesh`` in place, following ``tp_plan``."""
    plan = tp_plan(model, cfg)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return model


def validate(cfg: RunConfig, layout: Layout) -> None:
    """Every split dimension must divide by the TP degree (uneven splits are refused: attention
    heads cannot be split unevenly, and even shards keep communication predictable)."""
    t = layout.tp
    if cfg.model == "delay":
        raise ConfigError("--model delay has no matrices to split: use gpt or mnist-cnn with tensor parallel")
    if cfg.model == "mnist-cnn":
        if 128 % t or 9216 % t:
            raise ConfigError(f"tensor parallel {t} does not divide mnist-cnn's Linear(9216,128): use 1, 2, 4, 8...")
        if cfg.sequence_parallel or cfg.loss_parallel:
            raise ConfigError("--sequence-parallel and --loss-parallel apply to --model gpt")
    if cfg.model == "gpt":
        f = GPT_FLAVORS[cfg.flavor]
        for what, n in (("attention heads", f.heads), ("vocabulary", f.vocab), ("model width", f.dim)):
            if n % t:
                raise ConfigError(
                    f"tensor parallel {t} does not divide gpt {cfg.flavor}'s {what} ({n}): pick a divisor"
                )
        if cfg.sequence_parallel and f.seq_len % t:
            raise ConfigError(f"--sequence-parallel needs the sequence length {f.seq_len} divisible by {t}")
        if cfg.strategy == "pp" and cfg.sequence_parallel:
            raise ConfigError(
                "--sequence-parallel inside pipeline stages is not supported: drop it or use --strategy tp"
            )
    if cfg.strategy == "tp":
        count_blocks(cfg.model, cfg.flavor)  # model exists
