"""torchvision models cut into blocks: the cut is the model's own children in forward order,
verified against the original; resnet18 passes --check under mp and pp on CPU."""

from __future__ import annotations

import pytest
import torch

from core.config import ConfigError

from harness import run_ranks
from helpers import cfg, join, one_process

# small and quick on a 2-core machine: 32 x 32 images, batch 8, two steps, few evaluation images
RUN = dict(model="torchvision:resnet18", dataset="fakedata", batch_size=8, steps=2, eval_samples=16, check=True)


def test_resnet18_is_cut_at_its_children_in_forward_order():
    from core.models import build_model

    m = build_model("torchvision:resnet18")
    assert m.block_names() == [
        *("conv1", "bn1", "relu", "maxpool"),
        *("layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1", "layer4_0", "layer4_1"),
        *("avgpool", "fc"),
    ]
    # a child is itself the block where nothing else happens between it and the next: full names
    assert "blocks.layer1_0.conv1.weight" in dict(m.named_parameters())
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_the_cut_is_verified_against_the_original():
    from torchvision.models import resnet18

    from core.models.torchvision_blocks import TorchvisionBlocks, cut, verify

    torch.manual_seed(0)
    original = resnet18(num_classes=10)
    blocks = cut(original, "resnet18")
    verify(original, TorchvisionBlocks("resnet18", blocks, 32), 32, "resnet18")  # equal: no error
    swapped = dict(blocks)
    names = list(swapped)
    swapped[names[4]], swapped[names[5]] = swapped[names[5]], swapped[names[4]]  # layer1's two blocks
    with pytest.raises(ConfigError, match="computes another output"):
        verify(original, TorchvisionBlocks("resnet18", swapped, 32), 32, "resnet18")


def test_vit_glue_and_class_token_join_the_block_that_uses_them():
    from core.models import build_model

    m = build_model("torchvision:vit_b_16")
    assert m.block_names() == ["conv_proj", "encoder", "heads_head"]
    # the class token is the model's own parameter, outside every child: it sits with its user
    assert "blocks.conv_proj.class_token" in dict(m.named_parameters())
    assert m.tp_plan() is not None  # its encoder MLPs have a plan; a ResNet's convolutions do not
    assert build_model("torchvision:resnet18").tp_plan() is None


def test_unknown_torchvision_model_is_refused():
    from jobs.plan.strategies import validate_run

    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet7'"):
        validate_run(cfg(model="torchvision:resnet7"))
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        validate_run(cfg(strategy="tp", gpus=2, model="torchvision:resnet18"))


def test_resnet18_mp_3_passes_check():
    from core.training.train import run
    from mp import build

    c = cfg(strategy="mp", gpus=3, **RUN)
    r = run(c, one_process(c), build)
    # one process, the same kernels in the same order: equal to the last bit
    assert r["check"]["passed"] and r["check"]["max_grad_rel_diff"] == 0.0, r["check"]
    assert "FakeData" in r["data_source"] and len(r["stages"]) == 3


class Pipeline:
    def __call__(self) -> dict:
        from core.parallel import distributed
        from core.training.train import run
        from jobs.plan.strategies import get_build

        try:
            c = cfg(strategy="pp", gpus=2, schedule="gpipe", **RUN)
            r = run(c, join(c), get_build("pp"))
            return {"check": r["check"], "microbatches": r["microbatches"]}
        finally:
            distributed.shutdown()


def test_resnet18_pp_2_passes_check_with_batch_norm_per_micro_batch():
    r = run_ranks(Pipeline(), 2, timeout_s=600)[0]
    check = r["check"]
    # batch norm normalises each micro-batch on its own: the reference computes the same pieces,
    # so only the summation order of the gradients may differ (fp32: 1e-5, core.config)
    assert r["microbatches"] == 4
    assert check["passed"] and check["max_grad_rel_diff"] < 1e-5, check
    assert check["max_param_rel_diff"] <= check["param_tolerance"], check
