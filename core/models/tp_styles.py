"""Parallel styles torch does not ship, for plans to use beside ColwiseParallel and RowwiseParallel.

They live beside the models, whose plans name them, because core imports nothing from tp/.

``ReplicateParallel``: the module's parameters become Replicate DTensors on the tensor-parallel
mesh, its plain-tensor inputs enter as Replicate DTensors and its output leaves as a plain tensor
again, so the module computes exactly what it did (every rank the whole thing) and nothing is
communicated, forward or backward. It exists for the optimizer: when EVERY parameter is a DTensor on
one mesh, AdamW runs its fused (or foreach) kernels; one plain tensor among DTensors (a norm, a
position embedding) makes the multi-tensor kernels refuse the mix and AdamW steps tensor by tensor,
paying DTensor's dispatch per parameter and per operation (the largest cost profiled beyond the
all-reduces). torchtitan's ``NoParallel`` is the same idea.

``PrepareModuleInputCast``: PrepareModuleInput that casts to the autocast dtype before the
collective, so that tensor parallel's collectives move bf16 both ways under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel.style import ParallelStyle, PrepareModuleInput


class ReplicateParallel(ParallelStyle):
    """Replicate the module's parameters as DTensors; inputs and output stay plain tensors.

    Inputs that are already DTensors pass through unchanged (they must be Replicate for the
    module's result to be the whole one); ``use_local_output=False`` hands the output on as a DTensor.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    @staticmethod
    def _inputs(module: nn.Module, inputs: tuple, mesh) -> tuple:
        return tuple(
            DTensor.from_local(t, mesh, (Replicate(),), run_check=False)
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor)
            else t
            for t in inputs
        )

    def _output(self, module: nn.Module, output, mesh):
        return output.to_local() if self.use_local_output and isinstance(output, DTensor) else output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        # partition_fn None: distribute_module replicates every parameter and buffer
        return distribute_module(module, device_mesh, None, self._inputs, self._output)

    def __repr__(self) -> str:
        return f"ReplicateParallel(use_local_output={self.use_local_output})"


class PrepareModuleInputCast(PrepareModuleInput):
    """torch's PrepareModuleInput, casting a float input to the autocast dtype first (bf16 runs).

    Under bf16 autocast a norm's output is float32 and each linear casts it to bf16 itself. Left so,
    the collective that makes the input whole (sequence parallel: the forward all-gather) moves
    float32, and in backward the partial input gradients of the column-split linears come back cast
    to float32 before DTensor reduces them: every backward all-reduce (reduce-scatter) moved twice
    the bytes of its forward twin (a profile shows AllReduce_Sum_f32 beside AllReduce_Sum_bf16).
    Casting once here is the cast each linear would do (same values forward); backward the partial
    gradients add up and are reduced in bf16, as Megatron-LM reduces them. Without autocast
    (float32 runs, --check on CPU) nothing changes.
    """

    cast = True
    """False: exactly torch's PrepareModuleInput (bench/tp_profile.py's 'fp32comm' variant)."""

    def _prepare_input_arg(self, input, *args, **kwargs):
        if self.cast and isinstance(input, torch.Tensor) and input.is_floating_point():
            kind = input.device.type
            if torch.is_autocast_enabled(kind):
                dtype = torch.get_autocast_dtype(kind)
                if input.dtype != dtype:
                    input = input.to(dtype)
        return super()._prepare_input_arg(input, *args, **kwargs)
