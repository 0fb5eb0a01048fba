"""A drop-in for nn.Linear over a packed BCQ weight; the kernel is picked per call by the dispatcher."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qdllm.kernels.dispatch import bcq_linear
from qdllm.kernels.pack import BCQWeight


class QuantLinear(nn.Module):
    """The packed tensors are not parameters or buffers: `model.half()` must not touch the fp16 scales or the
    int32 planes. Moving the module moves them (see `_apply`)."""

    def __init__(self, weight: BCQWeight, backend: str):
        super().__init__()
        self.weight_packed, self.backend = weight, backend
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def forward(self, x: Tensor) -> Tensor:
        return bcq_linear(x, self.weight_packed, self.backend)

    def _apply(self, fn, recurse: bool = True):
        device = fn(torch.empty(0, device=self.weight_packed.planes.device)).device
        if device != self.weight_packed.planes.device:
            self.weight_packed = self.weight_packed.to(device)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        w = self.weight_packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={w.block_size}, "
                f"planes={w.num_planes}, backend={self.backend}")
