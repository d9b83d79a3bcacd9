"""torchvision classification models cut into blocks: ``--model torchvision:resnet18``.

The blocks are the model's own children in the order its forward calls them (an ``nn.Sequential``
child, such as a ResNet's ``layer1``, contributes its children: resnet18 has 14 blocks, resnet50
22). The order and the glue between children (``torch.flatten`` before a ResNet's ``fc``, the
class token a ViT concatenates) come from tracing the forward with torch.fx; each piece of glue
joins the block before it, a parameter outside the children (ViT's class token) joins the block
that uses it, and values needed further on travel as a tuple (the seam contract). The cut model is
checked when it is built: its output on one batch must equal the original's exactly.

Flavors are image sizes (tiny 32x32, small 64x64, 224); 10 classes. Data: MNIST (real digits,
resized and repeated to 3 channels) up to 64x64, torchvision's FakeData at 224.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from core.errors import ConfigError
from core.models.base import BlockModel

IMAGE_SIZES = {"tiny": 32, "small": 64, "224": 224}
NUM_CLASSES = 10


class TorchvisionBlocks(BlockModel):
    default_batch_size = 32
    default_lr = 0.01
    optimizer = (torch.optim.SGD, {"momentum": 0.9})  # torchvision's classification recipe
    datasets = ("mnist", "fakedata")
    classifier = True
    num_classes = NUM_CLASSES

    def __init__(self, arch: str, blocks: dict[str, nn.Module], size: int) -> None:
        super().__init__()
        self.arch = arch
        self.image_shape = (3, size, size)
        # real digits where they fit in memory; 224 x 224 MNIST would be 6 GB of floats
        self.default_dataset = "mnist" if size <= 64 else "fakedata"
        for name, block in blocks.items():
            self.blocks[name] = block

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def tp_plan(self, sequence_parallel: bool = False, loss_parallel: bool = False) -> dict | None:
        """Vision transformers: each encoder layer's MLP, Linear(d, 4d) split by columns and
        Linear(4d, d) by rows (the activations between them sharded on the hidden dimension, one
        all-reduce after); attention (nn.MultiheadAttention's packed projection) stays replicated.
        Convolutional networks have no plan: torch's tensor-parallel styles split Linear and
        Embedding layers, not convolutions."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan = {}
        for name, m in self.named_modules():
            if type(m).__name__ == "MLPBlock":  # torchvision.models.vision_transformer
                plan[f"{name}.0"], plan[f"{name}.3"] = ColwiseParallel(), RowwiseParallel()
        return plan or None

    def tp_refusal(self, tp: int, sequence_parallel: bool, loss_parallel: bool, in_pipeline: bool) -> str | None:
        for name, m in self.named_modules():
            if type(m).__name__ == "MLPBlock" and m[0].out_features % tp:
                return f"tensor parallel {tp} does not divide {name}'s {m[0].out_features} hidden units"
        return super().tp_refusal(tp, sequence_parallel, loss_parallel, in_pipeline)


def build(arch: str, flavor: str = "tiny") -> TorchvisionBlocks:
    from torchvision import models

    known = models.list_models(module=models)  # classification models only
    if arch not in known:
        raise ConfigError(
            f"unknown torchvision model {arch!r}: choose a classification model such as resnet18, resnet50 or vit_b_16"
        )
    size = IMAGE_SIZES[flavor]
    try:  # vision transformers are built for one image size
        original = models.get_model(arch, weights=None, num_classes=NUM_CLASSES, image_size=size)
    except TypeError:
        original = models.get_model(arch, weights=None, num_classes=NUM_CLASSES)
    model = TorchvisionBlocks(arch, cut(original, arch), size)
    verify(original, model, size, arch)
    return model


build.flavors = tuple(IMAGE_SIZES)


def units(model: nn.Module) -> list[str]:
    """The modules blocks are made of: the children, with Sequential children opened up."""
    out = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential) and len(child) > 0:
                walk(f"{prefix}{name}.", child)
            else:
                out.append(f"{prefix}{name}")

    walk("", model)
    return out


class _UnitTracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def cut(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    """Block name -> module, in forward order (see the module docstring)."""
    leaves = set(units(model))
    for name in leaves:
        # a block's input may be a pipeline stage's received tensor, a leaf that requires grad,
        # which an in-place activation (ResNet's ReLU(inplace=True)) must not overwrite
        if getattr(model.get_submodule(name), "inplace", False):
            model.get_submodule(name).inplace = False
    graph = _UnitTracer(leaves).trace(model)
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(inputs) != 1:
        raise ConfigError(f"torchvision:{arch} takes {len(inputs)} inputs; a block model takes one")

    # each node joins the block of the last unit called before it (glue before the first: the first)
    block_of: dict[fx.Node, int] = {}
    names: list[str] = []
    pending: list[fx.Node] = []
    for n in nodes:
        if n.op == "call_module" and n.target in leaves:
            name = n.target.replace(".", "_")
            names.append(name if name not in names else f"{name}_{names.count(name)}")
            for p in pending:
                block_of[p] = 0
            pending = []
        if not names:
            pending.append(n)
        else:
            block_of[n] = len(names) - 1
    block_of[inputs[0]] = -1

    # what crosses seam k (after block k): values made up to block k and used after it
    last_use = {}
    for n in nodes + [output]:
        at = block_of.get(n, len(names))
        for a in n.all_input_nodes:
            last_use[a] = max(last_use.get(a, -1), at)
    order = [inputs[0]] + nodes
    live = [[v for v in order if block_of[v] <= k < last_use.get(v, -1)] for k in range(len(names))]

    blocks = {}
    for k, name in enumerate(names):
        ins = [inputs[0]] if k == 0 else live[k - 1]
        own = [n for n in nodes if block_of[n] == k]
        outs = live[k] if k < len(names) - 1 else [output.args[0]]
        blocks[name] = _block(model, own, ins, outs)
    return blocks


def _block(model: nn.Module, own: list[fx.Node], ins: list[fx.Node], outs: list) -> nn.Module:
    """One block: the unit module itself where the block is exactly that call, else a GraphModule."""
    if len(own) == 1 and own[0].op == "call_module" and own[0].args == (ins[0],) and outs == own and len(ins) == 1:
        return model.get_submodule(own[0].target)
    g = fx.Graph()
    x = g.placeholder("x")
    env = {ins[0]: x} if len(ins) == 1 else {v: g.call_function(operator.getitem, (x, i)) for i, v in enumerate(ins)}
    for n in own:
        env[n] = g.node_copy(n, lambda a: env[a])
    values = [env[v] for v in outs]
    g.output(values[0] if len(values) == 1 else tuple(values))
    return fx.GraphModule(model, g)


@torch.no_grad()
def verify(original: nn.Module, cut_model: BlockModel, size: int, arch: str) -> None:
    """The cut model must compute exactly what the original does (eval mode: no dropout, batch
    norm from its running statistics, which stay untouched), and hand on only tensors."""
    device = next(original.parameters()).device
    if device.type == "meta":
        x = torch.empty(2, 3, size, size, device="meta")
    else:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    modes = original.training, cut_model.training
    original.eval()
    cut_model.eval()
    try:
        want, got = original(x), x
        for name, block in cut_model.blocks.items():
            got = block(got)
            values = got if isinstance(got, tuple) else (got,)
            if not all(isinstance(v, torch.Tensor) for v in values):
                raise ConfigError(
                    f"torchvision:{arch} cannot be cut after {name}: a non-tensor value crosses that seam"
                )
    finally:
        original.train(modes[0])
        cut_model.train(modes[1])
    if device.type != "meta" and not torch.equal(want, got):
        diff = (want - got).abs().max().item()
        raise ConfigError(f"torchvision:{arch} cut into blocks computes another output (max diff {diff:.3g})")
