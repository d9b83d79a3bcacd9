"""torchvision classification models cut into blocks: ``--model torchvision:resnet18``.

The blocks are the model's own children in the order its forward calls them (an ``nn.Sequential``
child, such as a ResNet's ``layer1``, contributes its children: resnet18 has 14 blocks, resnet50
22). The order and the glue between children (``torch.flatten`` before a ResNet's ``fc``, the
class token a ViT concatenates) come from tracing the forward with torch.fx; each piece of glue
joins the block before it, a parameter outside the children (ViT's class token) joins the block
that uses it, and values needed further on travel as a tuple (the seam contract). The cut model is
checked when it is built: its output on one batch must equal the original's exactly.

Flavors are image sizes (tiny 32x32, small 64x64, 224); 10 classes. A model that cannot take the
flavor's size takes the smallest it can: a ViT's size is rounded up to a multiple of its patch
(vit_h_14 tiny: 42), otherwise the size torchvision's own weights declare as their minimum
(``meta["min_size"]``: alexnet 63, inception_v3 75, maxvit_t 224); the data line says the size.
Data: MNIST (real digits, resized and repeated to 3 channels) up to 64x64, torchvision's FakeData
above. GoogLeNet and Inception v3 are built without their auxiliary classifiers (``aux_logits=False``,
as torchvision builds them for inference): in training mode those return a named tuple of three
logits, which neither the loss nor the parity check takes. A model that still cannot be built, cut
or verified is refused in one line (a ConfigError) naming the model and the reason.

``TorchvisionBlocks.uncut_names()`` maps every state_dict key of the cut model to the original's
(``blocks.layer1_0.bn1.running_mean`` -> ``layer1.0.bn1.running_mean``), found by tensor identity
when the model is built: an export loads strictly into ``torchvision.models.get_model(NAME)``.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator

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
        self._uncut_names: dict[str, str] = {}

    def uncut_names(self) -> dict[str, str]:
        """Every state_dict key of this model (parameters and persistent buffers) -> the key of the
        same tensor in the uncut torchvision model. A stage (``keep_only``) answers for the full
        model: a superset of its own keys, which is what a per-key lookup needs."""
        return dict(self._uncut_names)

    def name_uncut(self, original: nn.Module) -> None:
        """Find each key's original name by identity: the blocks hold the original's own modules and
        tensors (a GraphModule block copies references, not data), so no name is guessed. Every key
        of the original must be named too, or an export would not load strictly into it."""
        theirs: dict[int, str] = {}
        for key, t in original.state_dict(keep_vars=True).items():
            theirs.setdefault(id(t), key)
        ours = self.state_dict(keep_vars=True)
        missing = [k for k, t in ours.items() if id(t) not in theirs]
        if missing:
            raise ConfigError(f"torchvision:{self.arch}: {missing[0]} is no tensor of the original model")
        self._uncut_names = {k: theirs[id(t)] for k, t in ours.items()}
        unused = sorted(set(original.state_dict()) - set(self._uncut_names.values()))
        if unused:  # a module the forward never calls (none in torchvision 0.29's classifiers)
            raise ConfigError(
                f"torchvision:{self.arch}: the blocks leave out {unused[0]} (and {len(unused) - 1} more): "
                "its forward never uses it, so an export could not load into the original"
            )

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
    sizes = image_sizes(arch, IMAGE_SIZES[flavor])
    for size in sizes:
        try:
            original = _original(arch, size)
            model = TorchvisionBlocks(arch, cut(original, arch), size)
            verify(original, model, size, arch)
        except ConfigError:
            raise
        except (RuntimeError, AssertionError, ValueError, TypeError, NotImplementedError) as e:
            # the model cannot take this size (a kernel larger than its input, a window that does not
            # divide it) or cannot be traced: try the next size, and refuse in one line after the last
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            continue
        model.name_uncut(original)
        return model
    raise ConfigError(
        f"torchvision:{arch} cannot be built, cut and verified at {' or '.join(f'{s}x{s}' for s in sizes)} "
        f"(--flavor {flavor}): {why}"
    )


# keyword arguments beyond num_classes: the auxiliary classifiers of GoogLeNet and Inception v3
# return a named tuple of logits in training mode (neither a loss nor a parity check takes it);
# torchvision builds both without them for inference. init_weights=True is what None means today
# (said in a FutureWarning we answer by saying it).
EXTRA_KWARGS: dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def image_sizes(arch: str, size: int) -> list[int]:
    """The sizes to try, in order: the flavor's (a ViT's rounded up to a multiple of its patch, which
    its constructor requires), then the minimum torchvision's weights for this model declare."""
    from torchvision import models

    if arch.startswith("vit_"):  # vit_b_16, vit_h_14: the patch size ends the name
        patch = int(arch.rsplit("_", 1)[1])
        size = math.ceil(size / patch) * patch
    minimum = max(w.meta.get("min_size", (1, 1))[0] for w in models.get_model_weights(arch))
    return [size] if minimum <= size else [size, minimum]


def _original(arch: str, size: int) -> nn.Module:
    from torchvision import models

    kwargs = dict(weights=None, num_classes=NUM_CLASSES, **EXTRA_KWARGS.get(arch, {}))
    with _derived_on_cpu():
        try:  # vision transformers are built for one image size
            return models.get_model(arch, image_size=size, **kwargs)
        except TypeError:
            return models.get_model(arch, **kwargs)


@contextlib.contextmanager
def _derived_on_cpu() -> Iterator[None]:
    """The submitting host builds every model under ``torch.device("meta")`` (shapes, no memory).
    torchvision's RegNet builders derive their stage widths with tensor arithmetic
    (``BlockParams.from_init_params`` ends in ``.tolist()``), which a meta tensor cannot answer:
    "Cannot copy out of meta tensor". That arithmetic alone runs on the CPU; the weights stay meta."""
    from torchvision.models import regnet

    derive = regnet.BlockParams.__dict__["from_init_params"]  # the classmethod itself, to put back

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return derive.__func__(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = derive


build.flavors = tuple(IMAGE_SIZES)


def units(model: nn.Module) -> list[str]:
    """The modules blocks are made of: the children, with Sequential children opened up, and
    ModuleList/ModuleDict children too (never called themselves: maxvit's forward loops over
    ``self.blocks``, and a container as a unit would let the trace inline every layer inside it)."""
    out = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            # (a subclass with its own forward, densenet's _DenseBlock(nn.ModuleDict), is one unit)
            plain_container = isinstance(child, nn.Sequential) or type(child) in (nn.ModuleList, nn.ModuleDict)
            if plain_container and len(child) > 0:
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
        # torchvision.ops modules (StochasticDepth above all) stay calls: traced through, their
        # ``self.training`` and drop rate would be frozen into the graph as constants, out of reach
        # of eval() and of --check switching randomness off
        # (a Sequential among them, Conv2dNormActivation, is opened up like any other: its layers)
        ops = type(m).__module__.startswith("torchvision.ops") and not isinstance(m, nn.Sequential)
        return qualname in self.leaves or ops or super().is_leaf_module(m, qualname)


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
    block = fx.GraphModule(model, g)
    for name, t in list(block.named_buffers(recurse=False)):
        if name.startswith("_tensor_constant"):
            # a tensor the forward makes (fx keeps it as a buffer): no state of the model, so it
            # stays out of checkpoints and exports (uncut_names has no original name for it)
            block.register_buffer(name, t, persistent=False)
    return block


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
