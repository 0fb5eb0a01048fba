"""The decoder's elementwise steps, one Triton kernel each: RMSNorm (after the residual add, when given one),
rotate-half RoPE, and SiLU(gate) · up.

In torch these are 2 to 9 kernels each (casts, a square, a mean, products, a concatenation): 34 of a dense
fp16 layer's 47 kernels, 6 with these (the layer: 19; ops counted on the CPU). At small M a GPU spends a few
µs on every kernel whatever its size: 1.5 to 9 µs each on the H100 in a CUDA graph (2026-11-25 profile).

The numerics are engine/model.py's torch path, rounded where it rounds:
- RMSNorm sums in fp32, normalises in fp32, rounds to the activation dtype, then scales by the weight with one
  rounding (a product of two 16-bit floats is exact in fp32, so this is the 16-bit product);
- RoPE rotates in fp32 (LLaDA), or rounds every product and the sum to the activation dtype (Dream);
- SiLU in fp32, rounded, then the product rounded.
Products are not contracted into FMAs (`enable_fp_fusion=False`), since torch's separate kernels round each
one, so RoPE and the residual add are bit-exact; the RMSNorm's sum runs in another order than torch's.
The engine picks these or the torch path per forward (`engine.model.LayerOps`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, sum_ptr, out_ptr, D, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One row: sum = x + res (with HAS_RES), out = w * rms_norm(sum)."""
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row + cols, mask=ok, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + row + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    h = (xf * inv).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (w * h).to(dtype), mask=ok)


@triton.jit
def _round(v, dtype: tl.constexpr):
    return v.to(dtype).to(tl.float32)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, HALF, FP32: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """BLOCK_H heads of one token: y = x * cos + cat(-x2, x1) * sin, over the halves x1, x2."""
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_J)
    j_ok = j < HALF
    table = tok * 2 * HALF + j
    c1 = tl.load(cos_ptr + table, mask=j_ok, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + table + HALF, mask=j_ok, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + table, mask=j_ok, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + table + HALF, mask=j_ok, other=0.0)[None, :]
    offs = (tok * H + heads[:, None]) * 2 * HALF + j[None, :]
    ok = (heads < H)[:, None] & j_ok[None, :]
    dtype = y_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=ok, other=0.0).to(tl.float32)
    if FP32:
        y1 = x1 * c1 + -x2 * s1
        y2 = x2 * c2 + x1 * s2
    else:  # the tables and every product and sum rounded to the activation dtype
        c1, c2, s1, s2 = _round(c1, dtype), _round(c2, dtype), _round(s1, dtype), _round(s2, dtype)
        y1 = _round(x1 * c1, dtype) + _round(-x2 * s1, dtype)
        y2 = _round(x2 * c2, dtype) + _round(x1 * s2, dtype)
    tl.store(y_ptr + offs, y1.to(dtype), mask=ok)
    tl.store(y_ptr + offs + HALF, y2.to(dtype), mask=ok)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dtype = y_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), dtype)
    tl.store(y_ptr + offs, (silu * u).to(dtype), mask=ok)


def _warps(elements: int) -> int:
    """About 8 elements a thread, up to 16 warps."""
    return max(1, min(16, elements // 256))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _norm(x: Tensor, res: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: expected {x.dtype} [{x.shape[-1]}], got {weight.dtype} {list(weight.shape)}")
    x2 = _rows(x)
    out = torch.empty_like(x2)
    total = x2 if res is None else torch.empty_like(x2)
    block = triton.next_power_of_2(x2.shape[1])
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2 if res is None else _rows(res), weight, total, out, x2.shape[1], eps,
                                         HAS_RES=res is not None, BLOCK=block, num_warps=_warps(block), **NO_FMA)
    return total.view(x.shape), out.view(x.shape)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * RMSNorm(x) over the last dim, in x's dtype; weight has x's dtype."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + residual, weight * RMSNorm(x + residual)): the residual stream and the next sublayer's input."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual: expected {x.dtype} {list(x.shape)}, got {residual.dtype} {list(residual.shape)}")
    return _norm(x, residual, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor, fp32: bool) -> Tensor:
    """Rotate-half RoPE on x [B, L, H, D] with fp32 tables cos/sin [B, L, 1, D]; in fp32 when `fp32`, else in
    x's dtype."""
    B, L, H, D = x.shape
    if D % 2 or cos.shape != (B, L, 1, D) or sin.shape != cos.shape:
        raise ValueError(f"rope: expected an even head dim and cos/sin [{B}, {L}, 1, {D}], got x {list(x.shape)}, "
                         f"cos {list(cos.shape)}, sin {list(sin.shape)}")
    x = x.contiguous()
    y = torch.empty_like(x)
    block_j = triton.next_power_of_2(D // 2)
    block_h = min(triton.next_power_of_2(H), max(1, 2048 // block_j))
    if x.numel():
        _rope_kernel[(B * L, triton.cdiv(H, block_h))](
            x, cos.float().contiguous(), sin.float().contiguous(), y, H, D // 2, FP32=fp32, BLOCK_H=block_h,
            BLOCK_J=block_j, num_warps=_warps(block_h * block_j), **NO_FMA)
    return y


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SiLU(gate) * up, in their dtype."""
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"up: expected {gate.dtype} {list(gate.shape)}, got {up.dtype} {list(up.shape)}")
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    block = 1024
    if g.numel():
        _silu_mul_kernel[(triton.cdiv(g.numel(), block),)](g, u, y, g.numel(), BLOCK=block, num_warps=4, **NO_FMA)
    return y
