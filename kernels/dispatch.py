"""`bcq_linear`: pick the torch reference or a Triton kernel by backend, device and M (rows of x).

On a GPU: the Gluon mma kernel for small M where it was measured faster (`bcq_mma`: the signs unpacked in the
tensor cores' operand registers), else split-K GEMV (for the fewest rows, on FMA units where that was measured
faster), the tile kernel up to a crossover, and above it Ŵᵀ written for the call by the dequantize kernel, then
torch.matmul (cuBLAS wins once the GEMM is compute-bound). The dense weight is not cached: a cache per
linear would rebuild the whole fp16 model in memory. The crossovers differ per GPU, so they live in
GPU_CONFIGS, keyed by device name, as measured by benchmarks/kernels.py (other GPUs from sm_80 take the H100's);
tile shapes themselves are autotuned by Triton.

The kernel paths do no host sync and allocate only the output (and, for split-K, its fp32 buffer), so
they can be captured in a CUDA graph once a warm-up call has autotuned.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .pack import BCQWeight
from .reference import bcq_linear_reference

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class DispatchConfig:
    """Crossovers in M for one GPU."""

    mma_max_m: int = 0  # M <= this: the Gluon mma kernel (bcq_mma), for block sizes it takes, before every other
    # path (it was measured against them all up to here); 0 until measured
    fma_max_m: int = 0  # M <= this: split-K GEMV on FMA units (the "fma" variant); 0 until measured faster
    gemv_max_m: int = 16  # M <= this: split-K GEMV
    plane_dot_max_m: int = 0  # M <= this: the per-plane-dot variant; above: dequantize the tile, one dot
    dense_min_m: int = 256  # M >= this: the dequantize kernel writes Ŵᵀ for the call, then torch.matmul


DEFAULT_CONFIG = DispatchConfig()
# torch.cuda.get_device_name() -> measured crossovers. Read once per device: set entries before first use.
GPU_CONFIGS: dict[str, DispatchConfig] = {
    # benchmarks/results/kernels-llada-nvidia-h100-80gb-hbm3.json (2026-11-24); mma_max_m from
    # kernels-llada-mma-nvidia-h100-80gb-hbm3.json (2026-11-25: the mma kernel against the dequantize path)
    "NVIDIA H100 80GB HBM3": DispatchConfig(mma_max_m=64, gemv_max_m=32, plane_dot_max_m=32, dense_min_m=64),
}
# A GPU not measured yet, sm_80 or later (the mma kernel's tensor-core instruction), takes the H100's crossovers:
# the only ones measured, where every other path was slower than the mma kernel up to M = 64.
UNMEASURED_SM80 = GPU_CONFIGS["NVIDIA H100 80GB HBM3"]

@functools.cache
def _bcq() -> ModuleType | None:
    """The Triton kernels, imported on first use so CPU-only callers never pay for (or need) Triton."""
    try:
        from . import bcq
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        return None
    return bcq


@functools.cache
def _bcq_mma() -> ModuleType | None:
    """The Gluon kernel, where this Triton has Gluon with its Ampere mma (3.6 and later)."""
    try:
        from . import bcq_mma
    except ImportError as e:
        if e.name is not None and not e.name.startswith("triton"):
            raise
        return None
    return bcq_mma


@functools.cache
def config_for(device: torch.device) -> DispatchConfig:
    """The crossovers the dispatcher uses on `device`: its own measured ones, else by compute capability."""
    if device.type != "cuda":  # the interpreter
        return DEFAULT_CONFIG
    name = torch.cuda.get_device_name(device)
    if name in GPU_CONFIGS:
        return GPU_CONFIGS[name]
    return UNMEASURED_SM80 if torch.cuda.get_device_capability(device) >= (8, 0) else DEFAULT_CONFIG


def triton_unusable(x: Tensor, w: BCQWeight | None = None) -> str | None:
    """Why the Triton kernels cannot take x (and w), or None."""
    bcq = _bcq()
    if bcq is None:
        return "Triton is not installed"
    if not x.is_cuda and not bcq.INTERPRET:
        return f"the activations are on {x.device}; the Triton kernels need CUDA or TRITON_INTERPRET=1"
    if w is not None and x.device != w.planes.device:
        return f"the activations are on {x.device} but the weight is on {w.planes.device}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the activations are {x.dtype}; the Triton kernels take float16 or bfloat16"
    return None


def use_triton(x: Tensor, backend: str, w: BCQWeight | None = None) -> bool:
    """Whether a call on x runs Triton: "auto" on CUDA where the kernels can, "triton" always (ValueError where
    they cannot), "torch" never."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    reason = triton_unusable(x, w)
    if backend == "auto":
        return reason is None and x.is_cuda
    if reason is not None:
        raise ValueError(f"backend 'triton': {reason}")
    return True


def bcq_linear(x: Tensor, w: BCQWeight, backend: str = "auto") -> Tensor:
    """x [..., K] @ Ŵᵀ (+ bias), in x.dtype: Triton or the torch reference, as `use_triton` says."""
    if not use_triton(x, w=w, backend=backend):
        return bcq_linear_reference(x, w)
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device; torch's ops follow their tensors
            return _triton_linear(x, w)
    return _triton_linear(x, w)


def _triton_linear(x: Tensor, w: BCQWeight) -> Tensor:
    """The Triton path for M = x's rows, as measured on x's device."""
    bcq = _bcq()
    cfg = config_for(x.device)
    m = x.numel() // w.in_features
    if m <= cfg.mma_max_m and (mma := _bcq_mma()) is not None and mma.supports(w):
        return mma.bcq_mma(x, w)
    if m >= cfg.dense_min_m:
        return bcq.bcq_dense(x, w)
    if m <= cfg.fma_max_m:
        return bcq.bcq_gemv(x, w, "fma")
    variant = "per_plane" if m <= cfg.plane_dot_max_m else "dequant"
    if m <= cfg.gemv_max_m:
        return bcq.bcq_gemv(x, w, variant)
    return bcq.bcq_tile(x, w, variant)
