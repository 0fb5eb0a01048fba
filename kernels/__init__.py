"""qdllm.kernels: bit packing, the Triton BCQ kernels (bcq.py; bcq_mma.py in Gluon) and their torch reference,
and the decoder's fused elementwise kernels (elementwise.py).
Imports no other qdllm folder.

Triton is imported only when a Triton kernel first runs (see dispatch), so this package works without it.
"""
from .dispatch import BACKENDS, DEFAULT_CONFIG, GPU_CONFIGS, DispatchConfig, bcq_linear
from .pack import BCQWeight, pack, pack_signs, unpack_signs, validate
from .reference import bcq_linear_reference, dequantize

__all__ = [
    "BACKENDS", "BCQWeight", "DEFAULT_CONFIG", "DispatchConfig", "GPU_CONFIGS", "bcq_linear",
    "bcq_linear_reference", "dequantize", "pack", "pack_signs", "unpack_signs", "validate",
]
