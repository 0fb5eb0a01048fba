"""Dequantize-then-matmul in plain torch: the CPU path and the oracle the Triton kernels are tested against."""
from __future__ import annotations

import torch
from torch import Tensor

from .pack import BCQWeight

CHUNK = 1 << 20  # elements of Ŵ's planes per step: keeps the temporaries in cache, and bounded on large layers


def dequantize(w: BCQWeight, dtype: torch.dtype = torch.float16) -> Tensor:
    """Ŵ [N, K] in `dtype`, summed in fp32 (float64 when asked for) in plane order, so the only rounding is the
    final cast.

    A plane's term α_r α_c B_p is the magnitude α_r α_c with its sign bit flipped where B_p is −1: on a CPU that
    is about 2x faster than unpacking B_p to ±1 floats and multiplying, and it is exact all the same.
    """
    acc = torch.promote_types(dtype, torch.float32)
    bits = torch.int64 if acc == torch.float64 else torch.int32  # an integer view of one acc element
    n, g, nb, p = w.out_features, w.block_size, w.num_blocks, w.num_planes
    device = w.planes.device
    words = w.planes.permute(2, 0, 1).to(bits).contiguous()  # [N, P, G/32]
    to_sign_bit = torch.iinfo(bits).bits - 1 - torch.arange(32, device=device, dtype=bits)  # bit j -> sign bit
    sign_bit = torch.iinfo(bits).min
    alpha_r, alpha_c = w.alpha_r.T.to(acc)[:, :, None], w.alpha_c.to(acc)  # [N, P, 1], [P, G]
    block_of_plane = torch.repeat_interleave(  # output_size avoids a host sync on CUDA
        torch.arange(nb, device=device), w.orders, output_size=p)
    out = torch.zeros(n, nb, g, dtype=acc, device=device)
    rows = max(1, CHUNK // (p * g))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        flip = ((~words[lo:hi, :, :, None]) << to_sign_bit).view(hi - lo, p, g) & sign_bit  # where B_p is −1
        term = alpha_r[lo:hi] * alpha_c
        term.view(bits).bitwise_xor_(flip)
        out[lo:hi].index_add_(1, block_of_plane, term)
    return out.view(n, nb * g).to(dtype)


def bcq_linear_reference(x: Tensor, w: BCQWeight) -> Tensor:
    """x [..., K] @ Ŵᵀ (+ bias) in x.dtype, as nn.Linear computes a dense layer in that dtype: Ŵ summed in fp32
    and rounded once to x.dtype, then nn.Linear's own op, which adds the bias inside the GEMM (half-precision
    GEMMs accumulate in fp32 on CPUs and GPUs, and run on a CPU's bf16 units where it has them). float64 x gives
    the test oracle."""
    bias = None if w.bias is None else w.bias.to(x.dtype)
    return torch.nn.functional.linear(x, dequantize(w, x.dtype), bias)
