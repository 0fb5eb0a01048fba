"""Gluon BCQ GEMM for small M: Y[M, N] = X[M, K] · Ŵᵀ on mma.sync tensor cores (sm_80 and later), with the sign
planes unpacked straight into the mma's B operand registers, two weights per integer instruction.

Why Gluon: plain Triton builds the unpacked tile in a blocked layout and moves it through shared memory to the
dot operand's layout, which issues more instructions than the unpacking itself (DEVELOPERS.md). Gluon names the
layout. mma.m16n8k16's B operand holds two consecutive k of one column in each 32-bit register (k_width 2), so
each such pair is built where it is used:
- within each 32-column word, logical k = 2q + e (q < 16, e < 2) is input column q + 16e (`COLUMN`), so a pair's
  two signs are bits q and q + 16 of one word;
- one shift left by 15 - q puts them at bits 15 and 31, the sign bits of the pair's two halves;
- one LOP3 flips alpha_c's sign there where the bit is 0 (−1);
- one packed multiply(-add) by alpha_r adds the plane to the block's sum.
That is 3 instructions per 2 weights and plane. x is loaded in the same column order (an aligned vector load,
permuted in registers, then one trip through shared memory per K-block), and alpha_c is kept per weight in
that order and in x's dtype (`alpha_c_pairs`: 2 x 2.05 bytes per input column).

A program covers BLOCK_M rows of x, BLOCK_N rows of Ŵ and K_BLOCKS K-blocks, whose planes it sums in
registers before one dot over the block; fp32 atomics add the K-splits, as in `bcq.bcq_gemv`. The plane sum is
rounded to x's dtype at each plane (packed FMA), where the reference rounds once: within the tests' tolerance,
not bit-exact. Block sizes must be powers of two from 32 (`supports`).

Gluon has no interpreter: the tests compile this kernel for sm_80 to sm_90 on a CPU and check it against the
reference on CUDA.
"""
from __future__ import annotations

import weakref

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .bcq import _check, autotune
from .pack import BCQWeight

BLOCK_M = (16, 32, 64)  # one M tile per call, the smallest that covers M (mma.m16n8k16 takes 16 rows at least),
# and at most 8192 / G, so that x's block fits in registers
LOP3_ANDNOT_XOR = 0xA6  # LOP3's truth table for (~a & b) ^ c, with a = 0xF0, b = 0xCC, c = 0xAA
SIGN_BITS = 0x80008000  # the sign bits of two 16-bit halves in one 32-bit register
_SIGN = f"shl.b32 t, $1, $3;\nlop3.b32 t, t, {SIGN_BITS:#x}, $5, {LOP3_ANDNOT_XOR:#x};\n"
# Operands (pack=2, two k of one column): $0 the pair out; $1,$2 the word (twice); $3,$4 the shift (twice);
# $5 alpha_c's pair; $6 alpha_r twice; $7 the running sum. The first plane adds −0, which keeps the product exact.
ASM = {
    (dtype, first): ("{\n.reg .b32 t, z;\nmov.b32 z, " + f"{SIGN_BITS:#x};\n" + _SIGN + f"fma.rn.{ty} $0, t, $6, z;\n}}"
                     if first else "{\n.reg .b32 t;\n" + _SIGN + f"fma.rn.{ty} $0, t, $6, $7;\n}}")
    for dtype, ty in ((torch.float16, "f16x2"), (torch.bfloat16, "bf16x2")) for first in (True, False)
}


def column(k: Tensor) -> Tensor:
    """The input column (within a 32-column word) that logical k of the mma operand reads."""
    return k // 2 + 16 * (k % 2)


def shift(k: Tensor) -> Tensor:
    """The left shift that moves logical k's sign bit (column(k), or column(k) - 16 for the odd k of a pair, whose
    bit the shift takes to 31) to bit 15 of its pair."""
    return 15 - k // 2


@gluon.jit
def _plane(planes_ptr, acp_ptr, ar, p, rn3, k3, c3, sh3, w, N, ASM_: gl.constexpr, G: gl.constexpr,
           FIRST: gl.constexpr):
    """Plane p of the block, [G/32, 32, BLOCK_N], signed alpha_c times alpha_r, added to w unless FIRST."""
    words = gl.load(planes_ptr + (p * (G // 32) + c3) * N + rn3)  # [G/32, 1, BLOCK_N]
    ac = gl.load(acp_ptr + p * G + c3 * 32 + k3)  # [G/32, 32, 1], pairs adjacent
    if FIRST:
        return gl.inline_asm_elementwise(ASM_, "=r,r,r,r,r,r,r", [words, sh3, ac, ar], dtype=ar.dtype,
                                         is_pure=True, pack=2)
    return gl.inline_asm_elementwise(ASM_, "=r,r,r,r,r,r,r,r", [words, sh3, ac, ar, w], dtype=ar.dtype,
                                     is_pure=True, pack=2)


@gluon.jit
def _x_block(x_ptr, M, stride_xm, b, a_l: gl.constexpr, BLOCK_M_: gl.constexpr, G: gl.constexpr):
    """x's rows of this program on K-block b, [BLOCK_M, G], in the mma's A layout and logical column order."""
    NW: gl.constexpr = gl.num_warps()
    # [row, word, e, q]: 8 contiguous q a thread, so each load is one 16-byte vector
    x_l: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8], [8, 1, 2, 2], [NW, 1, 1, 1], [3, 2, 1, 0])
    s0: gl.constexpr = gl.SliceLayout(0, x_l)  # [word, e, q]
    rows = gl.program_id(0) * BLOCK_M_ + gl.arange(
        0, BLOCK_M_, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, x_l))))
    word = gl.arange(0, G // 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, s0)))
    e = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, s0)))
    q = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, s0)))
    cols = ((b * G + word * 32)[:, None, None] + (16 * e)[None, :, None] + q[None, None, :])
    x = gl.load(x_ptr + rows[:, None, None, None] * stride_xm + cols[None, :, :, :],
                mask=(rows < M)[:, None, None, None], other=0.0)
    return gl.convert_layout(gl.reshape(gl.permute(x, (0, 1, 3, 2)), [BLOCK_M_, G]), a_l)  # k = 2q + e


@gluon.jit
def _bcq_mma_kernel(x_ptr, planes_ptr, ar_ptr, acp_ptr, pp_ptr, bias_ptr, y_ptr, M, N, NB, stride_xm,
                    G: gl.constexpr, HAS_BIAS: gl.constexpr, FIRST_ASM: gl.constexpr, NEXT_ASM: gl.constexpr,
                    BLOCK_M_: gl.constexpr, BLOCK_N: gl.constexpr, K_BLOCKS: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # The B operand [G, BLOCK_N] seen as [G/32, 32, BLOCK_N], one word a (row, 32 columns): the same registers.
    l3: gl.constexpr = gl.reshape(gl.full([G, BLOCK_N], 0, gl.int32, layout=b_l), [G // 32, 32, BLOCK_N]).type.layout
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    # Rows past N read row N - 1 (no masks in the plane loop); their sums are never stored.
    rn = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3))), N - 1)
    k = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, l3)))
    c = gl.arange(0, G // 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, l3)))
    rn3 = rn[None, None, :]
    k3 = k[None, :, None]
    c3 = c[:, None, None]
    sh3 = 15 - k3 // 2  # `shift`
    acc = gl.zeros([BLOCK_M_, BLOCK_N], gl.float32, layout=mma)
    b_lo = pid_k * K_BLOCKS
    b_hi = gl.minimum(b_lo + K_BLOCKS, NB)
    for b in range(b_lo, b_hi):
        p_lo = gl.load(pp_ptr + b)
        p_hi = gl.load(pp_ptr + b + 1)
        ar = gl.load(ar_ptr + p_lo * N + rn3).to(dtype)
        w = _plane(planes_ptr, acp_ptr, ar, p_lo, rn3, k3, c3, sh3, ar, N, FIRST_ASM, G, True)
        for p in range(p_lo + 1, p_hi):
            ar = gl.load(ar_ptr + p * N + rn3).to(dtype)
            w = _plane(planes_ptr, acp_ptr, ar, p, rn3, k3, c3, sh3, w, N, NEXT_ASM, G, False)
        x = _x_block(x_ptr, M, stride_xm, b, a_l, BLOCK_M_, G)
        acc = mma_v2(x, gl.convert_layout(gl.reshape(w, [G, BLOCK_N]), b_l, assert_trivial=True), acc)
    rm = gl.program_id(0) * BLOCK_M_ + gl.arange(0, BLOCK_M_, layout=gl.SliceLayout(1, mma))
    rn_y = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    if HAS_BIAS:
        if pid_k == 0:  # added once, by the first K-split
            acc += gl.load(bias_ptr + rn_y, mask=rn_y < N, other=0.0).to(gl.float32)[None, :]
    y_ok = (rm < M)[:, None] & (rn_y < N)[None, :]
    gl.atomic_add(y_ptr + rm[:, None] * N + rn_y[None, :], acc, mask=y_ok, sem="relaxed")


def _configs() -> list[triton.Config]:
    """BLOCK_N over warps (one warp per BLOCK_N / num_warps rows of Ŵ) and K-blocks per program. Compiled for
    sm_90, 32 rows of Ŵ a warp keep a G = 128 block's sums in 64 registers a thread (168 in all), 64 rows in 128
    (255 in all, no spills, fewer warps resident). On the H100 the tuner took the smallest tiles at M <= 16 (32
    rows, one warp): there the kernel is bound by latency, not by the instructions it issues."""
    return [triton.Config({"BLOCK_N": bn, "K_BLOCKS": kb}, num_warps=w)
            for bn in (32, 64, 128, 256) for w in (1, 2, 4, 8) for kb in (1, 2, 4) if 8 <= bn // w <= 64]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tiles whose registers a thread, as estimated here, stay within 256: the block's sums (G/64 a row of Ŵ in the
    warp), the fp32 accumulators (BLOCK_M/32 a row) and x's block (BLOCK_M G/64). Compiled for sm_90, of those
    only the one-warp BLOCK_M 64 tile spills; timing discards it. No more K-blocks per program than there are."""
    g, bm, nb = kwargs["G"], kwargs["BLOCK_M_"], named_args["NB"]

    def registers(c: triton.Config) -> int:
        rows = c.kwargs["BLOCK_N"] // c.num_warps
        return rows * g // 64 + bm * rows // 32 + bm * g // 64

    kept = [c for c in configs if registers(c) <= 256 and c.kwargs["K_BLOCKS"] <= nb]
    return kept or configs[:1]


_kernel = autotune(_bcq_mma_kernel, _configs(), ["BLOCK_M_", "N", "NB", "G"], _prune, reset_to_zero=["y_ptr"])
_PAIRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # BCQWeight -> {dtype: alpha_c in pair order}


def supports(w: BCQWeight) -> bool:
    """Block sizes that are powers of two from 32: the kernel's tiles are [G/32, 32, BLOCK_N]."""
    g = w.block_size
    return g >= 32 and g & (g - 1) == 0


def alpha_c_pairs(w: BCQWeight, dtype: torch.dtype) -> Tensor:
    """alpha_c [P, G] in x's dtype with each word's columns in logical order (`column`), made once per weight and
    dtype: the kernel loads a pair's two scales as one 32-bit word."""
    per_weight = _PAIRS.setdefault(w, {})
    if dtype not in per_weight:
        g = w.block_size
        k = torch.arange(g, device=w.alpha_c.device)
        per_weight[dtype] = w.alpha_c[:, k // 32 * 32 + column(k % 32)].to(dtype).contiguous()
    return per_weight[dtype]


def bcq_mma(x: Tensor, w: BCQWeight) -> Tensor:
    """x [..., K] @ Ŵᵀ (+ bias) in x.dtype, for M up to a few tens: the planes summed in registers per K-block,
    one tensor-core dot per block, K-splits added into an fp32 buffer."""
    x2 = _check(x, w)
    if not supports(w):
        raise ValueError(f"block_size: the mma kernel takes powers of two from 32, got {w.block_size}")
    m, n = x2.shape[0], w.out_features
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    if m:
        # the smallest M tile that covers M, or the largest with BLOCK_M x G <= 8192 (x's block in 128 registers)
        bm = next((t for t in BLOCK_M if t >= m or 2 * t * w.block_size > 8192), BLOCK_M[-1])
        bias = w.bias if w.bias is not None else w.alpha_r  # any valid pointer when HAS_BIAS is off
        grid = lambda meta: (triton.cdiv(m, bm), triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                             triton.cdiv(w.num_blocks, meta["K_BLOCKS"]))
        _kernel[grid](x2, w.planes, w.alpha_r, alpha_c_pairs(w, x.dtype), w.plane_ptr, bias, y,
                      m, n, w.num_blocks, x2.stride(0), G=w.block_size, HAS_BIAS=w.bias is not None,
                      FIRST_ASM=ASM[x.dtype, True], NEXT_ASM=ASM[x.dtype, False], BLOCK_M_=bm)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
