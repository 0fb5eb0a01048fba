"""The Gluon mma kernel (kernels/bcq_mma.py): its pair encoding, emulated bit for bit on the CPU; its compilation for
each GPU family, without a GPU; and, on CUDA, its output against the float64 reference.

Gluon has no interpreter, so on a machine without CUDA only the first two run.
"""
import os
import subprocess
import sys

import pytest
import torch

from qdllm.kernels import bcq_linear, bcq_linear_reference, dequantize, dispatch, pack, unpack_signs
from test_kernels import TOL, random_codes, rel_err

try:
    from qdllm.kernels import bcq_mma
except ImportError:  # no Triton, or one without Gluon
    bcq_mma = None
needs_gluon = pytest.mark.skipif(bcq_mma is None, reason="Triton with Gluon is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="module")
def two_tiles_on_gpu():
    """On a GPU, the kernel autotunes over its first and last tiles only, as in test_kernels.py; the tile spread
    test runs the rest directly."""
    if bcq_mma is None or not torch.cuda.is_available():
        yield
        return
    saved = bcq_mma._kernel.configs
    bcq_mma._kernel.configs = [saved[0], saved[-1]]
    yield
    bcq_mma._kernel.configs = saved


def lop3(a: torch.Tensor, b: int, c: torch.Tensor, lut: int) -> torch.Tensor:
    """PTX lop3.b32 on int64 tensors holding 32-bit values: bit i of the result is bit (a_i b_i c_i) of lut."""
    out = torch.zeros_like(a)
    full = 0xFFFFFFFF
    for index in range(8):
        if lut >> index & 1:
            pick = [x if index >> bit & 1 else ~x & full for bit, x in ((2, a), (1, b), (0, c))]
            out |= pick[0] & pick[1] & pick[2]
    return out


def halves(pair: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """32-bit values -> [..., 2] of dtype: the low half is the pair's first (even k) element."""
    lo, hi = pair & 0xFFFF, pair >> 16
    return torch.stack([lo, hi], dim=-1).to(torch.int16).view(dtype)  # int16 wraps the high bit


def emulate_signed_alpha_c(w, dtype: torch.dtype) -> torch.Tensor:
    """[P, N, G] float64: each plane's alpha_c with the plane's signs, as the kernel builds it per logical pair (a
    shift, then LOP3 against alpha_c's pair), put back in input-column order."""
    g, n = w.block_size, w.out_features
    acp = bcq_mma.alpha_c_pairs(w, dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [P, G]
    ac_pairs = (acp[:, 0::2] | acp[:, 1::2] << 16).view(-1, g // 32, 1, 16)  # logical pairs (k even, k + 1)
    words = (w.planes.to(torch.int64) & 0xFFFFFFFF)[..., None]  # [P, G/32, N, 1]
    shifted = (words << bcq_mma.shift(torch.arange(0, 32, 2))) & 0xFFFFFFFF  # [P, G/32, N, 16]
    signed = halves(lop3(shifted, bcq_mma.SIGN_BITS, ac_pairs, bcq_mma.LOP3_ANDNOT_XOR), dtype).double()
    logical = signed.reshape(-1, g // 32, n, 32).permute(0, 2, 1, 3)  # [P, N, word, logical k]
    out = torch.empty(w.num_planes, n, g // 32, 32, dtype=torch.float64)
    out[..., bcq_mma.column(torch.arange(32))] = logical
    return out.reshape(-1, n, g)


@needs_gluon
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_encoding_signs_alpha_c(dtype):
    """The shift, the LOP3 table, the sign convention (bit 0 is −1), alpha_c_pairs' column order and the
    low-half-first packing give exactly ±alpha_c per plane."""
    codes, _ = random_codes([1, 3, 2, 2], n=24, g=64, seed=5)
    w = pack(codes)
    expected = (unpack_signs(w.planes).double() * 2 - 1) * w.alpha_c.to(dtype).double()[:, None, :]
    assert torch.equal(emulate_signed_alpha_c(w, dtype), expected)


@needs_gluon
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_encoding_rebuilds_the_weight(dtype):
    """Summed as the kernel sums (per plane, one multiply-add by alpha_r rounded to dtype; the first a multiply),
    Ŵ is within three roundings of dtype of the reference."""
    codes, _ = random_codes([1, 3, 2, 2], n=24, g=64, seed=5)
    w = pack(codes)
    signed = emulate_signed_alpha_c(w, dtype)
    ar = w.alpha_r.to(dtype).double()[:, :, None]
    got = torch.empty(w.out_features, w.in_features, dtype=torch.float64)
    for b in range(w.num_blocks):
        acc = torch.zeros(w.out_features, w.block_size, dtype=torch.float64)
        for p in range(w.plane_ptr[b].item(), w.plane_ptr[b + 1].item()):
            acc = (signed[p] * ar[p] + acc).to(dtype).double()  # exact product and sum, one rounding: an FMA
        got[:, b * w.block_size:(b + 1) * w.block_size] = acc
    ref = dequantize(w, torch.float64)
    assert (got - ref).abs().max() <= 3 * torch.finfo(dtype).eps * ref.abs().max()


@needs_gluon
def test_pair_helpers_are_a_permutation():
    k = torch.arange(32)
    assert sorted(bcq_mma.column(k).tolist()) == list(range(32))
    assert bcq_mma.column(k[1::2]).tolist() == (bcq_mma.column(k[0::2]) + 16).tolist()  # a pair: bits q, q + 16
    assert (bcq_mma.column(k[0::2]) + bcq_mma.shift(k[0::2])).tolist() == [15] * 16  # bit q -> 15, q + 16 -> 31


COMPILE = """
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from qdllm.kernels import bcq_mma
arch, act = int(sys.argv[1]), sys.argv[2]
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[act]
configs = bcq_mma._configs()
for bm in bcq_mma.BLOCK_M:
    for g in (32, 128, 256):
        kept = bcq_mma._prune(configs, {"NB": 8}, G=g, BLOCK_M_=bm)
        for cfg in (kept[0], kept[-1]):
            const = {"G": g, "HAS_BIAS": True, "FIRST_ASM": bcq_mma.ASM[dtype, True],
                     "NEXT_ASM": bcq_mma.ASM[dtype, False], "BLOCK_M_": bm, **cfg.kwargs}
            sig = {"x_ptr": "*" + act, "planes_ptr": "*i32", "ar_ptr": "*fp16", "acp_ptr": "*" + act,
                   "pp_ptr": "*i32", "bias_ptr": "*fp16", "y_ptr": "*fp32", "M": "i32", "N": "i32", "NB": "i32",
                   "stride_xm": "i32", **{k: "constexpr" for k in const}}
            k = triton.compile(GluonASTSource(bcq_mma._bcq_mma_kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": cfg.num_warps})
            ptx = k.asm["ptx"]
            print(bm, g, "mma.sync" in ptx, "lop3.b32 t, t, 0x80008000" in ptx, len(k.asm["cubin"]) > 0,
                  k.metadata.shared)
"""


@needs_gluon
@pytest.mark.parametrize("arch,act", [(80, "fp16"), (87, "bf16"), (89, "bf16"), (90, "bf16")])
def test_mma_kernel_compiles_for_gpus(arch, act):
    """A100, Jetson Orin, RTX 40, H100: the smallest and largest tile kept for each M tile and block size compile,
    use mma.sync with the pair encoding, and stage only x through shared memory (BLOCK_M x G halves)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE, str(arch), act], env=env, capture_output=True, text=True)
    rows = [line.split() for line in r.stdout.splitlines()]
    assert len(rows) == 2 * 3 * len(bcq_mma.BLOCK_M), r.stderr[-3000:]
    for bm, g, mma, encoding, cubin, shared in rows:
        assert (mma, encoding, cubin) == ("True", "True", "True"), (bm, g)
        assert int(shared) <= 2 * int(bm) * int(g), (bm, g, shared)


@needs_gluon
def test_mma_refuses_what_it_cannot_take():
    codes, _ = random_codes([2, 2], n=16, g=96)
    w = pack(codes)
    with pytest.raises(ValueError, match=r"block_size: the mma kernel takes powers of two from 32, got 96"):
        bcq_mma.bcq_mma(torch.zeros(1, 192, dtype=torch.float16), w)
    with pytest.raises(ValueError, match=r"x: expected float16 or bfloat16, got torch.float32"):
        bcq_mma.bcq_mma(torch.zeros(1, 192), w)
    assert not bcq_mma.supports(w)


# ---- CUDA ----

@needs_gluon
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16, 33, 70])
@pytest.mark.parametrize("g", [32, 128, 256])
def test_gpu_mma_matches_the_reference(dtype, m, g):
    """N = 1000 (no multiple of any tile), mixed orders, bias, every M tile (70 > 64: two M tiles)."""
    orders = torch.randint(1, 4, (2048 // g,), generator=torch.Generator().manual_seed(m + g)).tolist()
    codes, _ = random_codes(orders, n=1000, g=g, seed=m)
    w = pack(codes, bias=torch.randn(1000).half()).to("cuda")
    x = torch.randn(m, w.in_features, device="cuda").to(dtype)
    y = bcq_mma.bcq_mma(x, w)
    assert y.dtype == dtype and y.shape == (m, 1000)
    assert rel_err(y, bcq_linear_reference(x.double(), w)) <= TOL[dtype]


@needs_gluon
@cuda
def test_gpu_mma_tile_spread():
    """A spread of the tiles the kernel autotunes over, each run directly, on strided batched input."""
    codes, _ = random_codes([1, 3, 2, 2, 2, 2, 1, 3], n=1000, g=128, seed=11)
    w = pack(codes).to("cuda")
    x = torch.randn(3, 7, 2 * w.in_features, device="cuda", dtype=torch.bfloat16)[..., ::2]
    ref = bcq_linear_reference(x.double(), w).reshape(21, 1000)
    x2 = x.reshape(21, w.in_features).contiguous()
    configs = bcq_mma._prune(bcq_mma._configs(), {"NB": 8}, G=128, BLOCK_M_=32)
    for cfg in configs[:: max(1, len(configs) // 8)] + [configs[-1]]:
        y = torch.zeros(21, 1000, device="cuda")
        grid = (1, -(-1000 // cfg.kwargs["BLOCK_N"]), -(-8 // cfg.kwargs["K_BLOCKS"]))
        bcq_mma._bcq_mma_kernel[grid](
            x2, w.planes, w.alpha_r, bcq_mma.alpha_c_pairs(w, x.dtype), w.plane_ptr, w.alpha_r, y, 21, 1000, 8,
            x2.stride(0), G=128, HAS_BIAS=False, FIRST_ASM=bcq_mma.ASM[x.dtype, True],
            NEXT_ASM=bcq_mma.ASM[x.dtype, False], BLOCK_M_=32, **cfg.kwargs, num_warps=cfg.num_warps)
        assert rel_err(y, ref) <= TOL[torch.bfloat16], cfg
    assert bcq_mma.bcq_mma(x, w).shape == (3, 7, 1000)


@needs_gluon
@cuda
def test_gpu_dispatch_takes_mma_up_to_mma_max_m(monkeypatch):
    # at M = 16 the mma kernel comes before the dense path too (the H100's config has both at 64)
    config = dispatch.DispatchConfig(mma_max_m=16, dense_min_m=16)
    monkeypatch.setattr(dispatch, "config_for", lambda device: config)
    calls, real = [], bcq_mma.bcq_mma
    monkeypatch.setattr(bcq_mma, "bcq_mma", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    codes, _ = random_codes([2, 3, 1, 2], n=300, g=128, seed=2)
    w = pack(codes).to("cuda")
    for m in (1, 16, 17):
        x = torch.randn(m, w.in_features, device="cuda", dtype=torch.float16)
        assert rel_err(bcq_linear(x, w), bcq_linear_reference(x.double(), w)) <= TOL[torch.float16]
    assert calls == [1, 16]
