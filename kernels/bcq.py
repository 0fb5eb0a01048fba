"""Triton BCQ GEMM: Y[M, N] = X[M, K] · Ŵᵀ read straight from the packed planes, fp32 accumulation.

The kernel walks K one packed word (32 columns) at a time, so the unpacked [32, BLOCK_N] sign tile stays
in registers, and reads each block's planes through plane_ptr, so mixed orders cost no padding. Three
variants, selected by VARIANT:
- "per_plane": scale the X tile by alpha_c, dot with the ±1 plane, scale by alpha_r (one dot per plane);
- "dequant": build Σ_p α_r α_c B_p for the tile, then one dot (less tensor-core work, more FMAs);
- "fma": per plane, scale x by alpha_c and multiply-add ±x·alpha_r into a [BLOCK_M, 32, BLOCK_N] fp32
  accumulator in the sign tile's own register layout, summed over the 32 columns once at the end. No
  tensor cores: a dot needs at least 16 rows and a round trip of the tile through shared memory per step,
  which for one or two rows of x may cost more than the multiply itself. It is the dequantize kernel's
  unpacking without its stores, and that kernel unpacked a 4096x4096 weight in about 14 µs on an H100,
  writes included.
Two launches: `bcq_gemv`, split-K for small and middle M (each program sums K_BLOCKS K-blocks, down to
one, and fp32 atomics reduce them, since a grid over N alone is too small to fill the GPU: on an H100 the
tuner always took the finest split it was offered), with tiles of its own for "fma", and `bcq_tile`, one
program along K, for larger M.
For large M, `bcq_dense` writes Ŵᵀ once with a dequantize kernel that shares the tile's unpacking, then
multiplies with torch.matmul. Which path and variant win at which M is
measured per GPU by benchmarks/kernels.py.

Configurations are autotuned on a GPU, timing each candidate briefly (25 ms; a call takes tens of µs), and
the choices are kept in Triton's on-disk cache per GPU architecture, so a restarted server or a second
benchmark does not tune again. The Triton interpreter (TRITON_INTERPRET=1, read when this module is
imported) gets one fixed configuration, since autotuning several fails there.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.testing import do_bench

from .pack import BCQWeight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
VARIANTS = ("dequant", "per_plane", "fma")
SPLIT_BLOCK_M = (16, 32, 64)  # the split-K launch's M tiles; 16 is the smallest tl.dot a GPU accepts
# The FMA variant's M tiles. Compiled for sm_90, 1 and 2 rows keep the whole step in registers; from 4 rows
# Triton 3.9 moves x through shared memory, with two barriers, at every 32-column step.
FMA_BLOCK_M = (1, 2)
DEQUANT_BLOCK_N = 64  # the dequantize kernel is bound by its writes; rows of 64 fp16 are 128-byte stores


@triton.jit
def _plane(planes_ptr, ar_ptr, ac_ptr, p, c, rn, rj, n_ok, N, G: tl.constexpr):
    """Plane p on input columns c*32..c*32+31 and rows rn: its signs as a [32, BLOCK_N] bool tile (True = +1)
    and its scales alpha_c [32] and alpha_r [BLOCK_N] in fp32."""
    words = tl.load(planes_ptr + (p * (G // 32) + c) * N + rn, mask=n_ok, other=0)
    plus = ((words[None, :] >> rj[:, None]) & 1) != 0
    ac = tl.load(ac_ptr + p * G + c * 32 + rj).to(tl.float32)
    ar = tl.load(ar_ptr + p * N + rn, mask=n_ok, other=0.0).to(tl.float32)
    return plus, ac, ar


@triton.jit
def _dequant_tile(planes_ptr, ar_ptr, ac_ptr, p_lo, p_hi, c, rn, rj, n_ok, N, G: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Ŵᵀ on input columns c*32..c*32+31 and rows rn, [32, BLOCK_N] in fp32: Σ_p α_r α_c B_p, in plane order.

    alpha_c is signed before alpha_r multiplies it, one multiply-add an element, and the sum starts from the
    first plane, which every block has: compiled for sm_90, 6 to 24% fewer instructions a weight than signing
    the product and adding it to zeros, at every split-K tile but the narrowest (BLOCK_N 32: 4% more), and 15%
    fewer in the dequantize kernel."""
    plus, ac, ar = _plane(planes_ptr, ar_ptr, ac_ptr, p_lo, c, rn, rj, n_ok, N, G)
    w = tl.where(plus, ac[:, None], -ac[:, None]) * ar[None, :]
    for p in range(p_lo + 1, p_hi):
        plus, ac, ar = _plane(planes_ptr, ar_ptr, ac_ptr, p, c, rn, rj, n_ok, N, G)
        w += tl.where(plus, ac[:, None], -ac[:, None]) * ar[None, :]
    return w


@triton.jit
def _bcq_kernel(x_ptr, planes_ptr, ar_ptr, ac_ptr, pp_ptr, bias_ptr, y_ptr,
                M, N, NB, stride_xm, M_BUCKET,
                G: tl.constexpr, HAS_BIAS: tl.constexpr, VARIANT: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCKS: tl.constexpr):
    # M_BUCKET is only an autotuning key: one tuning per power-of-two bucket of M, not per M.
    # K_BLOCKS: the K-blocks one program sums, atomically added into fp32 y; 0: all of them, stored in y's dtype.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, 32)  # the bits of one word: each K step covers 32 input columns
    m_ok = rm < M
    n_ok = rn < N
    # The interpreter computes bf16 dots and sums wrongly, so it upcasts; a GPU dots in the activation dtype.
    dot_ty = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    if VARIANT == "fma":
        acc = tl.zeros((BLOCK_M, 32, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if K_BLOCKS == 0:
        b_lo = 0
        b_hi = NB
    else:
        b_lo = pid_k * K_BLOCKS
        b_hi = tl.minimum(b_lo + K_BLOCKS, NB)
    for b in range(b_lo, b_hi):
        p_lo = tl.load(pp_ptr + b)
        p_hi = tl.load(pp_ptr + b + 1)
        for c in range(G // 32):  # 32-column steps keep the unpacked [32, BLOCK_N] tiles in registers
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (b * G + c * 32 + rj)[None, :], mask=m_ok[:, None],
                        other=0.0)
            if VARIANT == "dequant":
                w = _dequant_tile(planes_ptr, ar_ptr, ac_ptr, p_lo, p_hi, c, rn, rj, n_ok, N, G, BLOCK_N)
                acc += tl.dot(x.to(dot_ty), w.to(dot_ty))
            else:  # a term per plane: x scaled by alpha_c, signed by the plane, scaled by alpha_r
                for p in range(p_lo, p_hi):
                    plus, ac, ar = _plane(planes_ptr, ar_ptr, ac_ptr, p, c, rn, rj, n_ok, N, G)
                    xs = x.to(tl.float32) * ac[None, :]
                    if VARIANT == "fma":
                        acc += tl.where(plus[None, :, :], xs[:, :, None], -xs[:, :, None]) * ar[None, None, :]
                    else:
                        signs = tl.where(plus, 1.0, -1.0).to(dot_ty)
                        acc += tl.dot(xs.to(dot_ty), signs) * ar[None, :]
    if VARIANT == "fma":
        acc = tl.sum(acc, axis=1)
    if HAS_BIAS:
        if pid_k == 0:  # added once, by the first K-split
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_offs = rm[:, None] * N + rn[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if K_BLOCKS == 0:
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:
        tl.atomic_add(y_ptr + y_offs, acc, mask=y_ok, sem="relaxed")  # order is irrelevant to a sum


@triton.jit
def _dequant_kernel(planes_ptr, ar_ptr, ac_ptr, pp_ptr, wt_ptr, N, G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Ŵᵀ [K, N] in wt's dtype; one program per (BLOCK_N rows of Ŵ, K-block)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, 32)
    n_ok = rn < N
    p_lo = tl.load(pp_ptr + b)
    p_hi = tl.load(pp_ptr + b + 1)
    for c in range(G // 32):
        w = _dequant_tile(planes_ptr, ar_ptr, ac_ptr, p_lo, p_hi, c, rn, rj, n_ok, N, G, BLOCK_N)
        tl.store(wt_ptr + (b * G + c * 32 + rj)[:, None] * N + rn[None, :], w.to(wt_ptr.dtype.element_ty),
                 mask=n_ok[None, :])


def _configs(launch: str) -> list[triton.Config]:
    """The tiles each launch autotunes over: "gemv" (split-K, tensor cores), "fma" (split-K, FMA) or "tile"."""
    if INTERPRET:  # small tiles keep the interpreter fast; one K-block per program exercises the atomics
        bm = FMA_BLOCK_M[-1] if launch == "fma" else 16
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": 32, "K_BLOCKS": 0 if launch == "tile" else 1}, num_warps=4)]
    # Fewer warps over wider tiles spread each program's fixed work (the scales' loads, the staging of x, the
    # atomics) over more weights. Compiled for sm_90 (Triton 3.9), a split-K program with BLOCK_N 128 and
    # BLOCK_M 16 or 32 issues 0.48 to 0.75 warp-instructions per weight at 2 warps, 0.61 to 0.79 at 4, 0.81 to
    # 1.21 at 8 (BLOCK_M 32); a one-row FMA program 0.25 to 0.40 at 1 or 2 warps, 0.40 to 0.80 at 4. Fewer
    # threads hide less latency, and some tiles spill a little, so the tuner decides.
    if launch == "gemv":  # down to one K-block per program: the H100 tuner took the finest split it was offered
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "K_BLOCKS": kb}, num_warps=w)
                for bm in SPLIT_BLOCK_M for bn in (32, 64, 128, 256) for kb in (1, 2, 4, 8) for w in (2, 4)
                if bm * bn <= 2048 * w]  # at most 64 accumulator registers a thread: wider tiles spill
    if launch == "fma":  # the accumulator holds BLOCK_M x 32 x BLOCK_N fp32: at most 128 registers a thread
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "K_BLOCKS": kb}, num_warps=w)
                for bm in FMA_BLOCK_M for bn in (64, 128, 256) for kb in (1, 2) for w in (1, 2, 4)
                if bm * bn <= 128 * w]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "K_BLOCKS": 0}, num_warps=w)
            for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8)
            if bm * bn <= 8192]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Time only tiles that M needs: the tile launch skips tiles taller than M; a split-K launch takes the one
    M tile of its set that covers M (or its tallest) and no more K-blocks per program than there are."""
    m, nb = named_args["M_BUCKET"], named_args["NB"]
    split = sorted({c.kwargs["BLOCK_M"] for c in configs if c.kwargs["K_BLOCKS"]})
    split_m = next((t for t in split if t >= m), split[-1]) if split else 0
    kept = [c for c in configs if (c.kwargs["K_BLOCKS"] == 0 and c.kwargs["BLOCK_M"] <= max(16, m))
            or (0 < c.kwargs["K_BLOCKS"] <= nb and c.kwargs["BLOCK_M"] == split_m)]
    return kept or configs[:1]


def autotune(fn, configs: list[triton.Config], key: list[str], prune, **extra) -> triton.runtime.Autotuner:
    """Triton's autotune with short timings and the on-disk cache, where this Triton takes `do_bench` and
    `cache_results` (3.6 does); an older Triton tunes with its defaults. Shared with bcq_mma."""
    tune = dict(key=key, prune_configs_by={"early_config_prune": prune},
                do_bench=functools.partial(do_bench, warmup=5, rep=25), cache_results=True, **extra)
    accepted = inspect.signature(triton.autotune).parameters
    return triton.autotune(configs, **{k: v for k, v in tune.items() if k in accepted})(fn)


def _autotune(configs: list[triton.Config], **extra) -> triton.runtime.Autotuner:
    return autotune(_bcq_kernel, configs, ["M_BUCKET", "N", "NB", "G", "VARIANT"], _prune, **extra)


_gemv_kernel = _autotune(_configs("gemv"), reset_to_zero=["y_ptr"])
_fma_kernel = _autotune(_configs("fma"), reset_to_zero=["y_ptr"])
_tile_kernel = _autotune(_configs("tile"))


def _check(x: Tensor, w: BCQWeight) -> Tensor:
    """x [..., K] -> a [M, K] view with unit column stride."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: expected float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x: expected last dim {w.in_features}, got {list(x.shape)}")
    x2 = x.reshape(-1, w.in_features)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(kernel, x2: Tensor, w: BCQWeight, y: Tensor, variant: str, **tile) -> None:
    """`tile`: BLOCK_M, BLOCK_N, K_BLOCKS and num_warps, when `kernel` is `_bcq_kernel` itself, not a tuner."""
    m, n = x2.shape[0], w.out_features
    if m == 0:
        return
    bias = w.bias if w.bias is not None else w.alpha_r  # any valid pointer when HAS_BIAS is off
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                         triton.cdiv(w.num_blocks, meta["K_BLOCKS"] or w.num_blocks))
    kernel[grid](x2, w.planes, w.alpha_r, w.alpha_c, w.plane_ptr, bias, y,
                 m, n, w.num_blocks, x2.stride(0), triton.next_power_of_2(m),
                 G=w.block_size, HAS_BIAS=w.bias is not None, VARIANT=variant,
                 UPCAST=INTERPRET and x2.dtype == torch.bfloat16, **tile)


def _variant(variant: str, allowed: tuple[str, ...]) -> str:
    if variant not in allowed:
        raise ValueError(f"variant: expected one of {', '.join(allowed)}, got {variant!r}")
    return variant


def bcq_gemv(x: Tensor, w: BCQWeight, variant: str = "dequant") -> Tensor:
    """Split-K path for small and middle M: partial sums over K-blocks added into an fp32 buffer, then cast to
    x.dtype. One program covers at most 64 rows of x (2 with "fma"), so above that each M tile unpacks the
    weight again."""
    kernel = _fma_kernel if _variant(variant, VARIANTS) == "fma" else _gemv_kernel
    x2 = _check(x, w)
    y = torch.zeros(x2.shape[0], w.out_features, device=x.device, dtype=torch.float32)
    _launch(kernel, x2, w, y, variant)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.out_features)


def bcq_tile(x: Tensor, w: BCQWeight, variant: str = "dequant") -> Tensor:
    """Tensor-core tile path: one dot per dequantized tile, or one per plane."""
    _variant(variant, VARIANTS[:2])
    x2 = _check(x, w)
    y = torch.empty(x2.shape[0], w.out_features, device=x.device, dtype=x.dtype)
    _launch(_tile_kernel, x2, w, y, variant)
    return y.reshape(*x.shape[:-1], w.out_features)


def bcq_dequantize(w: BCQWeight, dtype: torch.dtype) -> Tensor:
    """Ŵᵀ [K, N] in float16 or bfloat16: one read of the packed tensors and one write, summed in fp32 in
    plane order like `reference.dequantize`, so the two agree bit for bit where no FMA is fused."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected float16 or bfloat16, got {dtype}")
    # The interpreter truncates fp32 -> bf16 casts instead of rounding them, so there torch casts.
    store = torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype
    wt = torch.empty(w.in_features, w.out_features, device=w.planes.device, dtype=store)
    grid = (triton.cdiv(w.out_features, DEQUANT_BLOCK_N), w.num_blocks)
    _dequant_kernel[grid](w.planes, w.alpha_r, w.alpha_c, w.plane_ptr, wt, w.out_features,
                          G=w.block_size, BLOCK_N=DEQUANT_BLOCK_N)
    return wt.to(dtype)


def bcq_dense(x: Tensor, w: BCQWeight) -> Tensor:
    """Large-M path: Ŵᵀ dequantized for this call, then torch.matmul (cuBLAS once the GEMM is compute-bound)."""
    x2 = _check(x, w)
    y = x2 @ bcq_dequantize(w, x.dtype)
    if w.bias is not None:
        y += w.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], w.out_features)
