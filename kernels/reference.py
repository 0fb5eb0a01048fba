"""Dequantize-then-matmul in plain torch: the CPU path and the oracle the Triton kernels are tested against."""
from __future__ import annotations

import torch
from torch import Tensor

from .pack import BCQWeight, unpack_signs


def dequantize(w: BCQWeight, dtype: torch.dtype = torch.float16) -> Tensor:
    """Ŵ [N, K] in `dtype`, summed in fp32 (float64 when asked for), so the only rounding is the final cast."""
    acc_dtype = torch.promote_types(dtype, torch.float32)
    n, g, nb = w.out_features, w.block_size, w.num_blocks
    block_of_plane = torch.repeat_interleave(  # output_size avoids a host sync on CUDA
        torch.arange(nb, device=w.planes.device), w.orders, output_size=w.num_planes)
    signs = unpack_signs(w.planes).to(acc_dtype) * 2 - 1  # [P, N, G] of ±1
    scaled = signs * w.alpha_r.to(acc_dtype)[:, :, None] * w.alpha_c.to(acc_dtype)[:, None, :]
    blocks = torch.zeros(nb, n, g, dtype=acc_dtype, device=w.planes.device).index_add_(0, block_of_plane, scaled)
    return blocks.permute(1, 0, 2).reshape(n, nb * g).to(dtype)


def bcq_linear_reference(x: Tensor, w: BCQWeight) -> Tensor:
    """x [..., K] @ Ŵᵀ (+ bias) in fp32 (float64 for float64 x), returned in x.dtype."""
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(acc_dtype) @ dequantize(w, acc_dtype).T
    if w.bias is not None:
        y = y + w.bias.to(acc_dtype)
    return y.to(x.dtype)
