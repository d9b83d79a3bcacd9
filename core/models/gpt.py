"""A small decoder-only transformer (GPT-2 style, pre-norm) cut into blocks.

Blocks: ``embed`` (token + position), ``h0`` .. ``h{L-1}`` (attention + MLP), ``head`` (final norm
and vocabulary projection). Layer names are what a tensor-parallel plan addresses:
``blocks.h0.attn.q/k/v/o`` and ``blocks.h0.mlp.up/down``. Attention reshapes with ``-1`` heads, so
a column-split q/k/v (fewer local heads per rank) runs unchanged. Embedding and head are not tied:
tied weights would have to cross pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.models.base import BlockModel


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
    def __init__(self, flavor: str = "tiny") -> None:
        super().__init__()
        self.flavor = GPT_FLAVORS[flavor]
        f = self.flavor
        self.blocks["embed"] = Embed(f)
        for i in range(f.layers):
            self.blocks[f"h{i}"] = Layer(f.dim, f.heads)
        self.blocks["head"] = Head(f)
        self.apply(_init)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten())


def _init(m: nn.Module) -> None:
    # GPT-2's init: N(0, 0.02) weights; keeps a deep stack's activations in range from step one
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
