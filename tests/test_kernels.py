"""Packing, the torch reference and the Triton BCQ kernels, against float64 constructions from signs and scales.

On a machine without CUDA, conftest sets TRITON_INTERPRET=1, so the Triton kernels run (slowly) on the
CPU: shapes stay tiny. With CUDA the same small tests run on the GPU (DEVICE), and the GPU tests at the
end add larger shapes.
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from qdllm.kernels import (bcq_linear, bcq_linear_reference, dequantize, dispatch, pack, pack_signs, reference,
                           unpack_signs)

try:
    from qdllm.kernels import bcq
except ModuleNotFoundError:  # no Triton (macOS): packing and the reference are still tested
    bcq = None
needs_triton = pytest.mark.skipif(bcq is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" runs the Triton kernels interpreted

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative error (Frobenius) against float64
KERNELS = {
    "gemv": lambda x, w: bcq.bcq_gemv(x, w),
    "gemv_per_plane": lambda x, w: bcq.bcq_gemv(x, w, "per_plane"),
    "gemv_fma": lambda x, w: bcq.bcq_gemv(x, w, "fma"),
    "tile": lambda x, w: bcq.bcq_tile(x, w),
    "tile_per_plane": lambda x, w: bcq.bcq_tile(x, w, "per_plane"),
    "dense": lambda x, w: bcq.bcq_dense(x, w),
}


def random_codes(orders: list[int], n: int, g: int, seed: int = 0):
    """Per-block codes with fp16-representable scales, and Ŵ built from them directly in float64."""
    gen = torch.Generator().manual_seed(seed)
    codes, blocks = [], []
    for o in orders:
        signs = torch.rand(o, n, g, generator=gen) > 0.5
        a_r = (torch.rand(o, n, generator=gen) * 0.09 + 0.01).half().double()
        a_c = (torch.rand(o, g, generator=gen) + 0.5).half().double()
        codes.append((signs, a_r, a_c))
        blocks.append(sum(a_r[p][:, None] * a_c[p][None, :] * (signs[p].double() * 2 - 1) for p in range(o)))
    return codes, torch.cat(blocks, dim=1)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True, scope="module")
def two_tiles_on_gpu():
    """On a GPU, the launches autotune over their first and last tiles only: the full sets would compile
    hundreds of variants for these small shapes. test_gpu_tile_spread runs a spread of the rest directly."""
    tuners = [] if bcq is None or DEVICE == "cpu" else [bcq._gemv_kernel, bcq._fma_kernel, bcq._tile_kernel]
    saved = [t.configs for t in tuners]
    for t in tuners:
        t.configs = [t.configs[0], t.configs[-1]]
    yield
    for t, configs in zip(tuners, saved):
        t.configs = configs


@pytest.fixture(scope="module")
def weight():
    """N = 80 is no multiple of the tiles; mixed orders 1..3 over K = 4 blocks of 32; on DEVICE."""
    codes, _ = random_codes([1, 3, 2, 2], n=80, g=32)
    return pack(codes, bias=torch.randn(80, generator=torch.Generator().manual_seed(1)).half()).to(DEVICE)


# ---- packing ----

def test_pack_unpack_round_trip_is_exact():
    signs = torch.rand(3, 5, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    signs[0] = True  # every word -1
    signs[1] = False
    signs[1, :, 31] = True  # only bit 31 of word 0: -2^31
    planes = pack_signs(signs)
    assert planes.dtype == torch.int32 and planes.shape == (3, 2, 5)
    assert (planes[0] == -1).all()
    assert (planes[1, 0] == -(2**31)).all() and (planes[1, 1] == 0).all()
    assert torch.equal(unpack_signs(planes), signs)


def test_pack_bit_layout():
    """Bit j of word w of plane p, column n is the sign of input column 32w + j."""
    signs = torch.rand(2, 3, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    planes = pack_signs(signs)
    for p, n, k in [(0, 0, 0), (0, 2, 31), (1, 1, 32), (1, 2, 63), (1, 0, 45)]:
        word = int(planes[p, k // 32, n]) & 0xFFFFFFFF
        assert (word >> (k % 32)) & 1 == int(signs[p, n, k])


def test_pack_builds_the_csr_layout_and_counts_every_bit():
    codes, _ = random_codes([1, 3], n=8, g=32)
    w = pack(codes)
    assert w.plane_ptr.tolist() == [0, 1, 4]
    assert w.orders.tolist() == [1, 3]
    assert (w.out_features, w.in_features, w.block_size, w.num_planes) == (8, 64, 32, 4)
    # planes 4*1*8 words * 32 + alpha_r 4*8 * 16 + alpha_c 4*32 * 16 + plane_ptr 3 * 32, over 8*64 weights
    assert w.effective_bits == (1024 + 512 + 2048 + 96) / 512
    assert pack(codes, bias=torch.zeros(8, dtype=torch.float16)).effective_bits == (3680 + 128) / 512


@pytest.mark.parametrize("change, message", [
    (dict(planes=torch.zeros(4, 1, 8, dtype=torch.int64)), r"planes: expected int32 \[4, 1, 8\], got int64"),
    (dict(planes=torch.zeros(4, 8, dtype=torch.int32)), r"planes: expected int32 \[P, 1, N\]"),
    (dict(alpha_r=torch.zeros(4, 9, dtype=torch.float16)), r"alpha_r: expected float16 \[4, 8\], got float16 \[4, 9\]"),
    (dict(alpha_c=torch.zeros(4, 32)), r"alpha_c: expected float16 \[4, 32\], got float32"),
    (dict(plane_ptr=torch.tensor([0, 1, 4])), r"plane_ptr: expected int32 \[3\], got int64"),
    (dict(plane_ptr=torch.tensor([0, 0, 4], dtype=torch.int32)), r"plane_ptr: block 0 has order 0, expected 1..3"),
    (dict(plane_ptr=torch.tensor([0, 3, 2], dtype=torch.int32)), r"plane_ptr: expected to run from 0 to P=4"),
    (dict(plane_ptr=torch.tensor([1, 2, 4], dtype=torch.int32)), r"plane_ptr: expected to run from 0 to P=4"),
    (dict(block_size=48), r"block_size: expected a positive multiple of 32, got 48"),
    (dict(in_features=80), r"in_features: expected a positive multiple of block_size 32, got 80"),
    (dict(bias=torch.zeros(7)), r"bias: expected a float \[8\], got float32 \[7\]"),
])
def test_validation_names_the_tensor(change, message):
    w = pack(random_codes([1, 3], n=8, g=32)[0])
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(w, **change)


def test_order_above_three_is_rejected():
    codes, _ = random_codes([4], n=8, g=32)
    with pytest.raises(ValueError, match=r"block 0 has order 4, expected 1..3"):
        pack(codes)


# ---- torch reference ----

def test_dequantize_equals_the_float64_construction():
    codes, expected = random_codes([2, 1, 3, 2], n=24, g=64)
    w = pack(codes)
    assert torch.equal(dequantize(w, torch.float64), expected)
    assert torch.equal(dequantize(w, torch.float16), expected.half())


@pytest.mark.parametrize("chunk", [1, 3 * 64 * 8 + 1])  # one row per step; 3 rows and a short last step
def test_dequantize_in_row_chunks(monkeypatch, chunk):
    codes, expected = random_codes([2, 1, 3, 2], n=10, g=64, seed=1)
    monkeypatch.setattr(reference, "CHUNK", chunk)
    assert torch.equal(dequantize(pack(codes), torch.float64), expected)


def test_reference_linear_with_bias():
    codes, expected = random_codes([3, 1], n=16, g=32)
    bias = torch.randn(16, dtype=torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    y = bcq_linear_reference(x, pack(codes, bias=bias))
    torch.testing.assert_close(y, x @ expected.T + bias, rtol=1e-12, atol=1e-12)
    assert bcq_linear_reference(x.half(), pack(codes)).dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_computes_in_half_precision_like_a_dense_layer(dtype):
    """Half-precision x gets Ŵ rounded to its dtype and one matmul in that dtype, as nn.Linear would (not an fp32
    upcast: a CPU runs bf16 GEMMs on its bf16 units), within the dtype's error of the float64 oracle."""
    codes, expected = random_codes([2, 3, 1], n=48, g=32)
    w = pack(codes)
    x = torch.randn(7, 96, dtype=torch.float64)
    y = bcq_linear_reference(x.to(dtype), w)
    assert y.dtype == dtype and torch.equal(y, torch.nn.functional.linear(x.to(dtype), dequantize(w, dtype)))
    assert rel_err(y, x @ expected.T) <= TOL[dtype]


# ---- Triton kernels (interpreted without CUDA) ----

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_kernels_match_the_reference(weight, kernel, m, dtype):
    x = torch.randn(m, weight.in_features, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    y = KERNELS[kernel](x, weight)
    assert y.dtype == dtype and y.shape == (m, weight.out_features)
    assert rel_err(y, bcq_linear_reference(x.double(), weight)) <= TOL[dtype]


@needs_triton
def test_triton_takes_batched_strided_input_without_bias_and_block_96():
    codes, expected = random_codes([2, 3], n=40, g=96, seed=3)
    w = pack(codes).to(DEVICE)
    x = torch.randn(2, 3, 2 * w.in_features, dtype=torch.float16, device=DEVICE)[..., ::2]  # column stride 2
    for y in (bcq.bcq_tile(x, w), bcq.bcq_gemv(x, w), bcq.bcq_gemv(x, w, "fma"), bcq.bcq_dense(x, w)):
        assert y.shape == (2, 3, 40)
        assert rel_err(y, x.double() @ expected.T.to(DEVICE)) <= TOL[torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("orders, n, g", [([1, 3, 2, 2], 80, 32), ([2, 3], 130, 96)])
def test_dequantize_kernel_matches_the_reference(orders, n, g, dtype):
    """Same fp32 sums in the same plane order: identical bits in the interpreter; on a GPU a fused FMA
    may move the last fp32 bit, so at most one rounding step of the output dtype."""
    codes, _ = random_codes(orders, n=n, g=g, seed=n)
    w = pack(codes).to(DEVICE)
    wt = bcq.bcq_dequantize(w, dtype)
    assert wt.dtype == dtype and wt.shape == (w.in_features, n)
    ref = dequantize(w, dtype).T
    if DEVICE == "cpu":
        assert torch.equal(wt, ref)
    else:
        torch.testing.assert_close(wt, ref, rtol=torch.finfo(dtype).eps, atol=0)
    with pytest.raises(ValueError, match=r"dtype: expected float16 or bfloat16, got torch.float32"):
        bcq.bcq_dequantize(w, torch.float32)


# ---- dispatch ----

def test_dispatch_rejects_an_unknown_backend(weight):
    with pytest.raises(ValueError, match=r"backend: expected one of auto, torch, triton, got 'cuda'"):
        bcq_linear(torch.zeros(1, weight.in_features), weight, backend="cuda")


def test_dispatch_uses_the_reference_on_cpu(weight):
    weight = weight.to("cpu")
    x = torch.randn(3, weight.in_features, dtype=torch.bfloat16)
    ref = bcq_linear_reference(x, weight)
    assert torch.equal(bcq_linear(x, weight), ref)
    assert torch.equal(bcq_linear(x, weight, backend="torch"), ref)


@pytest.mark.parametrize("name, capability, expected", [
    ("NVIDIA H100 80GB HBM3", (9, 0), dispatch.GPU_CONFIGS["NVIDIA H100 80GB HBM3"]),
    ("NVIDIA GeForce RTX 4090", (8, 9), dispatch.GPU_CONFIGS["NVIDIA H100 80GB HBM3"]),  # unmeasured: the H100's
    ("Orin", (8, 7), dispatch.GPU_CONFIGS["NVIDIA H100 80GB HBM3"]),
    ("Tesla T4", (7, 5), dispatch.DEFAULT_CONFIG),  # no bf16 mma.m16n8k16: the mma kernel stays off
])
def test_dispatch_config_by_device_name_then_capability(monkeypatch, name, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dispatch.config_for.cache_clear()
    try:
        assert dispatch.config_for(torch.device("cuda", 0)) == expected
        assert dispatch.config_for(torch.device("cpu")) == dispatch.DEFAULT_CONFIG
    finally:
        dispatch.config_for.cache_clear()


@needs_triton
@pytest.mark.parametrize("m", [2, 17, 256])  # GEMV, tile, dequantize kernel + matmul
def test_dispatch_triton_paths(weight, m):
    x = torch.randn(m, weight.in_features, dtype=torch.float16, device=DEVICE)
    assert rel_err(bcq_linear(x, weight, backend="triton"), bcq_linear_reference(x.double(), weight)) <= 2e-3


@needs_triton
def test_dispatch_takes_the_fma_variant_up_to_fma_max_m(weight, monkeypatch):
    """A GPU whose measured crossovers put the FMA variant first gets it up to fma_max_m rows, then the dot."""
    monkeypatch.setattr(dispatch, "config_for", lambda device: dispatch.DispatchConfig(fma_max_m=2, gemv_max_m=16))
    variants, gemv = [], bcq.bcq_gemv
    monkeypatch.setattr(bcq, "bcq_gemv", lambda x, w, variant: variants.append(variant) or gemv(x, w, variant))
    for m in (1, 2, 3):
        x = torch.randn(m, weight.in_features, dtype=torch.float16, device=DEVICE)
        assert rel_err(bcq_linear(x, weight, backend="triton"), bcq_linear_reference(x.double(), weight)) <= 2e-3
    assert variants == ["fma", "fma", "dequant"]


@needs_triton
def test_launches_name_an_unknown_variant(weight):
    x = torch.zeros(1, weight.in_features, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"variant: expected one of dequant, per_plane, fma, got 'plane'"):
        bcq.bcq_gemv(x, weight, "plane")
    with pytest.raises(ValueError, match=r"variant: expected one of dequant, per_plane, got 'fma'"):
        bcq.bcq_tile(x, weight, "fma")


@needs_triton
def test_dispatch_triton_explains_what_it_cannot_run(weight, monkeypatch):
    with pytest.raises(ValueError,
                       match=r"backend 'triton': the activations are torch.float32; .* float16 or bfloat16"):
        bcq_linear(torch.zeros(1, weight.in_features, device=DEVICE), weight, backend="triton")
    monkeypatch.setattr(bcq, "INTERPRET", False)
    with pytest.raises(ValueError, match=r"backend 'triton': the activations are on cpu; the Triton kernels need CUDA"):
        bcq_linear(torch.zeros(1, weight.in_features, dtype=torch.float16), weight, backend="triton")


def test_kernels_work_without_triton(tmp_path):
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from qdllm.kernels import bcq_linear, pack\n"
            "w = pack([(torch.ones(1, 4, 32, dtype=torch.bool), torch.ones(1, 4), torch.ones(1, 32))])\n"
            "print(bcq_linear(torch.ones(1, 32), w).tolist())\n"
            "try: bcq_linear(torch.ones(1, 32, dtype=torch.float16), w, backend='triton')\n"
            "except ValueError as e: print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    expected = ["[[32.0, 32.0, 32.0, 32.0]]", "backend 'triton': Triton is not installed"]
    assert r.stdout.splitlines() == expected, r.stderr


# Compiles the kernel to PTX and cubin for each GPU family the product targets, without a GPU: this is
# Triton's real compiler (type checks, layouts, tensor-core lowering), which the interpreter skips.
COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qdllm.kernels import bcq
arch, act = int(sys.argv[1]), sys.argv[2]
for launch, variants in (("gemv", ("dequant", "per_plane")), ("fma", ("fma",)), ("tile", ("dequant", "per_plane"))):
    configs = bcq._configs(launch)
    for cfg in (configs[0], configs[-1]):  # the smallest and the largest tile each launch autotunes over
        for variant in variants:
            const = {"G": 128, "HAS_BIAS": True, "VARIANT": variant, "UPCAST": False, **cfg.kwargs}
            sig = {"x_ptr": "*" + act, "planes_ptr": "*i32", "ar_ptr": "*fp16", "ac_ptr": "*fp16",
                   "pp_ptr": "*i32", "bias_ptr": "*fp16", "y_ptr": "*" + act if launch == "tile" else "*fp32",
                   "M": "i32", "N": "i32", "NB": "i32", "stride_xm": "i32", "M_BUCKET": "i32",
                   **{k: "constexpr" for k in const}}
            k = triton.compile(ASTSource(bcq._bcq_kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            print(launch, variant, "mma" in k.asm["ptx"], len(k.asm["cubin"]) > 0, k.metadata.shared)
const = {"G": 128, "BLOCK_N": bcq.DEQUANT_BLOCK_N}
sig = {"planes_ptr": "*i32", "ar_ptr": "*fp16", "ac_ptr": "*fp16", "pp_ptr": "*i32", "wt_ptr": "*" + act,
       "N": "i32", **{k: "constexpr" for k in const}}
k = triton.compile(ASTSource(bcq._dequant_kernel, sig, const), target=GPUTarget("cuda", arch, 32))
print("dequantize", "-", "-", len(k.asm["cubin"]) > 0, k.metadata.shared)
"""
SHARED_LIMIT = {80: 163 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block


@needs_triton
@pytest.mark.parametrize("arch,act", [(80, "fp16"), (87, "fp16"), (89, "bf16"), (90, "fp16"), (90, "bf16")])
def test_kernels_compile_for_gpus(arch, act):
    """A100 (sm_80), Jetson Orin (sm_87), RTX 40 (sm_89), H100 (sm_90): every GEMM variant compiles and fits
    the family's shared memory; the dot variants use the tensor cores (mma), the FMA variant and the
    dequantize kernel do not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE, str(arch), act], env=env, capture_output=True, text=True)
    rows = [line.split() for line in r.stdout.splitlines()]
    assert len(rows) == 11, r.stderr[-3000:]
    *gemm, (name, _, _, cubin, shared) = rows
    assert (name, cubin) == ("dequantize", "True") and int(shared) <= SHARED_LIMIT[arch]
    for launch, variant, mma, cubin, shared in gemm:
        assert (mma, cubin) == (str(variant != "fma"), "True"), (launch, variant)
        assert int(shared) <= SHARED_LIMIT[arch], (launch, variant, shared)


# ---- GPU ----

@needs_triton
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 33, 300])
def test_gpu_kernels_and_dispatch(dtype, m):
    orders = torch.randint(1, 4, (8,), generator=torch.Generator().manual_seed(m)).tolist()
    codes, _ = random_codes(orders, n=1000, g=128, seed=m)
    w = pack(codes, bias=torch.randn(1000).half()).to("cuda")
    x = torch.randn(m, w.in_features, device="cuda").to(dtype)
    ref = bcq_linear_reference(x.double(), w)
    for name, kernel in KERNELS.items():
        assert rel_err(kernel(x, w), ref) <= TOL[dtype], name
    assert rel_err(bcq_linear(x, w), ref) <= TOL[dtype]


@needs_triton
@cuda
@pytest.mark.parametrize("launch", ["gemv", "fma", "tile"])
def test_gpu_tile_spread(launch):
    """A spread of the tiles each launch autotunes over, from the smallest to the largest (every M tile, N
    tile and K split), each with the launch's variants, run directly on N = 1000 (no multiple of any tile)."""
    configs = bcq._configs(launch)
    spread = configs[:: max(1, len(configs) // 6)]
    spread += [] if configs[-1] in spread else [configs[-1]]
    codes, _ = random_codes([1, 3, 2, 2, 2, 2, 1, 3], n=1000, g=128, seed=11)
    w = pack(codes, bias=torch.randn(1000).half()).to("cuda")
    x = torch.randn(70, w.in_features, device="cuda", dtype=torch.float16)
    ref = bcq_linear_reference(x.double(), w)
    for cfg in spread:
        for variant in ("fma",) if launch == "fma" else ("dequant", "per_plane"):
            y = (torch.empty if launch == "tile" else torch.zeros)(
                70, 1000, device="cuda", dtype=torch.float16 if launch == "tile" else torch.float32)
            bcq._launch(bcq._bcq_kernel, x, w, y, variant, **cfg.kwargs, num_warps=cfg.num_warps)
            assert rel_err(y, ref) <= TOL[torch.float16], (cfg, variant)
