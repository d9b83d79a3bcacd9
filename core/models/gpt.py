"""A small decoder-only transformer (GPT-2 style, pre-norm) cut into blocks.

Blocks: ``embed`` (token + position), ``h0`` .. ``h{L-1}`` (attention + MLP), ``head`` (final norm
and vocabulary projection). Layer names are what a tensor-parallel plan addresses:
``blocks.h0.attn.q/k/v/o`` and ``blocks.h0.mlp.up/down``. Attention reshapes with ``-1`` heads, so
a column-split q/k/v (fewer local heads per rank) runs unchanged. Embedding and head are not tied:
tied weights would have to cross pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from core.data import Dataset, Split, synthetic_tokens
from core.models.base import BlockModel
from core.models.tp_styles import PrepareModuleInputCast, ReplicateParallel

if TYPE_CHECKING:
    from core.data import Dataset


@dataclass(frozen=True)
class GPTFlavor:
    dim: int
    layers: int
    heads: int
    seq_len: int
    vocab: int


# Named sizes. tiny is for tests (divisible by TP 1, 2, 4); the large ones match the shapes of
# shared/bench/gpt_anchor.py so benchmarks compare like with like.
GPT_FLAVORS = {
    "tiny": GPTFlavor(dim=32, layers=4, heads=4, seq_len=16, vocab=128),
    "small": GPTFlavor(dim=256, layers=8, heads=8, seq_len=256, vocab=8192),
    "124m": GPTFlavor(dim=768, layers=12, heads=12, seq_len=1024, vocab=50304),
    "356m": GPTFlavor(dim=1024, layers=24, heads=16, seq_len=2048, vocab=50304),
    "1.3b": GPTFlavor(dim=2048, layers=24, heads=16, seq_len=2048, vocab=50304),
    "2.7b": GPTFlavor(dim=2560, layers=32, heads=20, seq_len=2048, vocab=50304),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallel each rank holds heads/tp of them
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self, f: GPTFlavor) -> None:
        super().__init__()
        self.tok = nn.Embedding(f.vocab, f.dim)
        self.pos = nn.Embedding(f.seq_len, f.dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Head(nn.Module):
    def __init__(self, f: GPTFlavor) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(f.dim)
        self.out = nn.Linear(f.dim, f.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class GPT(BlockModel):
    default_batch_size = 8
    default_lr = 3e-4
    optimizer = (torch.optim.AdamW, {"weight_decay": 0.0, "fused": True})
    tp_layer = "blocks.h0"

    def __init__(self, flavor: str = "tiny") -> None:
        super().__init__()
        self.flavor, self.flavor_name = GPT_FLAVORS[flavor], flavor
        f = self.flavor
        self.blocks["embed"] = Embed(f)
        for i in range(f.layers):
            self.blocks[f"h{i}"] = Layer(f.dim, f.heads)
        self.blocks["head"] = Head(f)
        self.apply(_init)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten())

    def synthetic_data(self, batch_size: int, seed: int) -> Dataset:
        f = self.flavor
        # enough sequences for a few hundred steps, bounded in memory for long sequences
        n = min(max(64 * batch_size, 1024), max(4 * batch_size, 2_000_000 // f.seq_len))
        split = synthetic_tokens(n + batch_size, f.seq_len, f.vocab, seed)
        desc = f"synthetic token stream: {n:,} sequences of {f.seq_len} tokens, vocabulary {f.vocab}"
        return Dataset(Split(split.x[:n], split.y[:n]), Split(split.x[n:], split.y[n:]), desc)

    sp_dim = 0
    """The dimension of (B, T, d) that sequence parallel shards the tokens on: 0, each rank holds
    B/tp whole sequences (contiguous shards: NCCL gathers and scatters them in place); 1, each rank
    T/tp positions of every sequence, Megatron's picture, which costs a copy (torch.cat) around every
    all-gather and reduce-scatter in this (B, T, d) layout: 10 ms of a 356m step on an H200
    (measured). Norms, residual adds and dropout are per token, so either split computes the same."""

    def tp_plan(self, sequence_parallel: bool = False, loss_parallel: bool = False) -> dict | None:
        """Megatron's split (Shoeybi et al. 2019). Between blocks the activations are REPLICATED
        (every rank holds the whole (B, T, d) tensor) or, with sequence parallel, SHARDED OVER THE
        TOKENS (Shard(sp_dim), by default whole sequences: B/tp rows). The vocabulary-parallel embedding sums
        partial lookups; the head is column-split over the vocabulary (loss parallel: the logits
        stay sharded, Shard(-1), and cross-entropy reduces across ranks). Blocks a pipeline stage
        does not hold are left out of its plan by the style."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
        )

        layers = [n for n in self.blocks if n[0] == "h" and n[1:].isdigit()]  # h0..h{L-1}, not head
        plan: dict = {"blocks.embed.tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
        # every parameter a DTensor, the unsplit ones Replicate: AdamW then steps fused (core/models/tp_styles.py)
        plan["blocks.embed.pos"] = ReplicateParallel()
        if sequence_parallel and layers:
            # the first layer receives the replicated embedding and keeps only its token shard
            plan[f"blocks.{layers[0]}"] = PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(self.sp_dim),)
            )
        for name in layers:
            plan.update(gpt_layer_plan(f"blocks.{name}", sequence_parallel, self.sp_dim))
        norm = SequenceParallel(sequence_dim=self.sp_dim) if sequence_parallel else ReplicateParallel()
        plan["blocks.head.norm"] = norm
        plan["blocks.head.out"] = ColwiseParallel(
            input_layouts=Shard(self.sp_dim) if sequence_parallel else Replicate(),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
        return plan

    def tp_refusal(self, tp: int, sequence_parallel: bool, loss_parallel: bool, in_pipeline: bool) -> str | None:
        """Uneven splits are refused: heads cannot be split unevenly, and even shards keep
        communication predictable."""
        f = self.flavor
        for what, n in (("attention heads", f.heads), ("vocabulary", f.vocab), ("model width", f.dim)):
            if n % tp:
                return f"tensor parallel {tp} does not divide gpt {self.flavor_name}'s {what} ({n}): pick a divisor"
        if sequence_parallel and self.sp_dim == 1 and f.seq_len % tp:
            return f"--sequence-parallel needs the sequence length {f.seq_len} divisible by {tp}"
        if in_pipeline and sequence_parallel:
            return "--sequence-parallel inside pipeline stages is not supported: drop it or use --strategy tp"
        return None


def gpt_layer_plan(prefix: str, sequence_parallel: bool, sp_dim: int = 0) -> dict:
    """One transformer layer: q, k, v column-split (each rank computes heads/tp heads), o
    row-split; MLP up column-split (4d/tp hidden units per rank), down row-split. Each row-split
    matmul leaves partial sums that ONE all-reduce joins: two all-reduces forward per layer, two
    backward. Sequence parallel turns each into a reduce-scatter plus an all-gather and shards the
    norms. ``attn`` and ``mlp`` take their input as one replicated DTensor (use_local_output=False)
    so q, k and v share it: their partial input gradients add up before ONE backward all-reduce,
    cast to the autocast dtype first (core/models/tp_styles.py PrepareModuleInputCast: bf16 collectives both
    ways; the norms' float32 output made them float32 in backward and, sequence parallel, forward)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    between = Shard(sp_dim) if sequence_parallel else Replicate()  # layout of activations between blocks
    plan = {
        f"{prefix}.attn": PrepareModuleInputCast(
            input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        f"{prefix}.attn.q": ColwiseParallel(),
        f"{prefix}.attn.k": ColwiseParallel(),
        f"{prefix}.attn.v": ColwiseParallel(),
        # with sequence parallel the residual stream stays a DTensor (Shard) between blocks
        f"{prefix}.attn.o": RowwiseParallel(output_layouts=between, use_local_output=not sequence_parallel),
        f"{prefix}.mlp": PrepareModuleInputCast(
            input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        f"{prefix}.mlp.up": ColwiseParallel(),
        f"{prefix}.mlp.down": RowwiseParallel(output_layouts=between, use_local_output=not sequence_parallel),
    }
    # the norms: sharded on the sequence (sequence parallel) or whole on every rank, their weights
    # Replicate DTensors either way so that AdamW steps every parameter fused (core/models/tp_styles.py)
    for ln in ("ln1", "ln2"):
        plan[f"{prefix}.{ln}"] = SequenceParallel(sequence_dim=sp_dim) if sequence_parallel else ReplicateParallel()
    return plan


def build(flavor: str = "tiny") -> GPT:
    return GPT(flavor)


build.flavors = tuple(GPT_FLAVORS)


def _init(m: nn.Module) -> None:
    # GPT-2's init: N(0, 0.02) weights; keeps a deep stack's activations in range from step one
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
