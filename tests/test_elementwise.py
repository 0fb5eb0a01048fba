"""The Triton elementwise steps (kernels/elementwise.py) against the engine's torch path, which the model tests
pin to float64 references; and the model's choice between them.

In the interpreter (conftest, without CUDA) fp16 rounds as a GPU does, so RoPE and the residual add must match
torch bit for bit there. Triton 3.9's interpreter truncates fp32 to bf16 instead of rounding to nearest, so
bf16 gets one bf16 step of slack per rounding on the CPU, and must be exact (RoPE) on CUDA.
"""
import pytest
import torch
from tiny import MASK

from qdllm.engine import load_model
from qdllm.engine import model as M
from qdllm.kernels import dispatch

triton = pytest.importorskip("triton")
from qdllm.kernels import elementwise as E  # noqa: E402  (needs Triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" runs the kernels interpreted
DTYPES = (torch.float16, torch.bfloat16)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def steps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, in units of the dtype's step at each element's magnitude."""
    ulp = torch.finfo(a.dtype).eps * a.float().abs().clamp(min=torch.finfo(a.dtype).tiny)
    return ((a.float() - b.float()).abs() / ulp).max().item()


def exact_here(dtype: torch.dtype) -> bool:
    return dtype == torch.float16 or DEVICE == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch_within_a_rounding(dtype):
    """D = 96 is not a power of two: the row's tail is masked. The sum's order differs from torch's, so the
    normalised value may round the other way."""
    x, w = randn(3, 5, 96, dtype=dtype, seed=0, scale=3.0), randn(96, dtype=dtype, seed=1, scale=0.1) + 1
    out = E.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    assert steps(M.rms_norm(x, w, 1e-5), out) <= (1 if exact_here(dtype) else 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_exactly_and_normalises_the_sum(dtype):
    x, r = randn(4, 80, dtype=dtype, seed=2), randn(4, 80, dtype=dtype, seed=3, scale=5.0)
    w = randn(80, dtype=dtype, seed=4, scale=0.1) + 1
    total, out = E.add_rms_norm(x, r, w, 1e-6)
    ref_total, ref_out = M.add_rms_norm(x, r, w, 1e-6)
    if exact_here(dtype):
        assert torch.equal(total, ref_total)
    assert steps(ref_total, total) <= 1
    assert steps(ref_out, out) <= (1 if exact_here(dtype) else 3)


@pytest.mark.parametrize("fp32", [True, False], ids=["fp32 (LLaDA)", "activation dtype (Dream)"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_is_torchs_rotation_bit_for_bit(dtype, fp32):
    """6 heads of 24 (tiles of 8 heads and 16 pairs, both masked), at positions far apart, as a cache feeds."""
    positions = torch.tensor([[0, 7, 1000, 4095], [3, 2, 1, 17]], device=DEVICE)
    cos, sin = M.rope_tables(positions, 24, 500000.0)
    x = randn(2, 4, 6, 24, dtype=dtype, seed=5, scale=2.0)
    out, ref = E.rope(x, cos, sin, fp32), M.apply_rope(x, cos, sin, fp32)
    if exact_here(dtype):
        assert torch.equal(out, ref)
    else:  # where the two terms cancel, truncation errors are large against the result, not against x
        torch.testing.assert_close(out, ref, rtol=0, atol=4 * torch.finfo(dtype).eps * x.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch_within_a_rounding(dtype):
    """1500 elements: two programs, the second masked. exp differs from torch's in its last fp32 bits."""
    g, u = randn(3, 500, dtype=dtype, seed=6, scale=4.0), randn(3, 500, dtype=dtype, seed=7)
    out = E.silu_mul(g, u)
    assert out.shape == g.shape and out.dtype == dtype
    assert steps(M.silu_mul(g, u), out) <= (1 if exact_here(dtype) else 3)


def test_empty_inputs_launch_nothing():
    x = torch.zeros(0, 64, device=DEVICE, dtype=torch.float16)
    w = torch.ones(64, device=DEVICE, dtype=torch.float16)
    assert E.rms_norm(x, w, 1e-5).shape == (0, 64)
    assert E.silu_mul(x, x).shape == (0, 64)


def test_mismatched_operands_are_refused_in_one_line():
    x = torch.zeros(2, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^weight: expected torch.float16 \[64\], got torch.float32 \[64\]$"):
        E.rms_norm(x, torch.ones(64, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match=r"^residual: expected torch.float16 \[2, 64\], got torch.float16 \[1, 64\]$"):
        E.add_rms_norm(x, x[:1], torch.ones(64, device=DEVICE, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match=r"^up: expected"):
        E.silu_mul(x, x.float())
    cos = torch.zeros(1, 2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"^rope: expected .* cos/sin \[1, 2, 1, 16\]"):
        E.rope(torch.zeros(1, 2, 3, 16, device=DEVICE, dtype=torch.float16), cos, cos, True)


def test_backends_pick_the_ops():
    x = torch.zeros(1, 4, device=DEVICE, dtype=torch.float16)
    assert dispatch.use_triton(x, "triton") and not dispatch.use_triton(x, "torch")
    assert dispatch.use_triton(x, "auto") == (DEVICE == "cuda")  # the interpreter only when asked for
    with pytest.raises(ValueError,
                       match=r"^backend 'triton': the activations are torch.float32; .*float16 or bfloat16$"):
        dispatch.use_triton(x.float(), "triton")
    with pytest.raises(ValueError, match=r"^backend: expected one of auto, torch, triton, got 'cuda'$"):
        dispatch.use_triton(x, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_with_triton_ops_gives_the_torch_ops_tokens(model_dir, dtype):
    """The whole forward, LLaDA (fp32 rotation) and Dream (grouped K/V heads, q/k/v biases, rotation in the
    activation dtype): logits within half precision's noise, and the same argmax at every masked position
    where the kernels round as a GPU does."""
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(8))
    ids[:, 6:] = MASK
    ids = ids.to(DEVICE)
    ref_model = load_model(model_dir, device=DEVICE, dtype=dtype, backend="torch")
    model = load_model(model_dir, device=DEVICE, dtype=dtype, backend="triton")
    assert M.triton_ops() is not M.TORCH_OPS
    ref, out = ref_model(ids).float(), model(ids).float()
    assert ((out - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 2e-2)
    if exact_here(dtype):
        assert torch.equal(out[:, 6:].argmax(-1), ref[:, 6:].argmax(-1))


def test_a_dense_checkpoint_refuses_triton_where_it_cannot_run(llada_dir):
    with pytest.raises(ValueError, match=r"^backend 'triton' cannot run here: the activations are torch.float32; "):
        load_model(llada_dir, device=DEVICE, dtype=torch.float32, backend="triton")
    assert load_model(llada_dir, device=DEVICE, backend="dense").backend == "auto"


# Triton's real compiler, which the interpreter skips, for each GPU family the product targets, without a GPU.
COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qdllm.kernels import elementwise as E
arch, act = int(sys.argv[1]), sys.argv[2]
kernels = {
    "rms_norm": (E._rms_norm_kernel, {"x_ptr": "*" + act, "res_ptr": "*" + act, "w_ptr": "*" + act,
                 "sum_ptr": "*" + act, "out_ptr": "*" + act, "D": "i32", "eps": "fp32"},
                 {"HAS_RES": True, "BLOCK": 4096}, 16),
    "rope": (E._rope_kernel, {"x_ptr": "*" + act, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "y_ptr": "*" + act,
             "H": "i32", "HALF": "i32"}, {"FP32": True, "BLOCK_H": 32, "BLOCK_J": 64}, 8),
    "rope_act": (E._rope_kernel, {"x_ptr": "*" + act, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "y_ptr": "*" + act,
                 "H": "i32", "HALF": "i32"}, {"FP32": False, "BLOCK_H": 32, "BLOCK_J": 64}, 8),
    "silu_mul": (E._silu_mul_kernel, {"g_ptr": "*" + act, "u_ptr": "*" + act, "y_ptr": "*" + act, "n": "i32"},
                 {"BLOCK": 1024}, 4),
}
for name, (fn, sig, const, warps) in kernels.items():
    sig = {**sig, **{k: "constexpr" for k in const}}
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps, **E.NO_FMA})
    print(name, "fma.rn.f32" in k.asm["ptx"], len(k.asm["cubin"]) > 0)
"""


@pytest.mark.parametrize("arch,act", [(80, "fp16"), (87, "fp16"), (89, "bf16"), (90, "fp16"), (90, "bf16")])
def test_kernels_compile_for_gpus_without_fmas(arch, act):
    """A100, Jetson Orin, RTX 40, H100: every kernel compiles to a cubin, and no fp32 product is contracted into
    an FMA, which would round differently from torch's separate kernels. (Before sm_90 a 16-bit add or product
    is a 16-bit FMA with 1 or −0, a single rounding: what fp32 then rounding gives, the fp32 step having more
    than twice the bits.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE, str(arch), act], env=env, capture_output=True, text=True)
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows == [[name, "False", "True"] for name in ("rms_norm", "rope", "rope_act", "silu_mul")], r.stderr[-3000:]
