"""The quantization methods behind `--method`, with one interface: a weight and its calibration H in,
the tensors to store and the weight the model will compute with out."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from qdllm.kernels.pack import BCQWeight, pack
from qdllm.kernels.reference import dequantize

from .quant_dllm import quant_dllm
from .uniform import gptq, rtn

METHODS = ("quant-dllm", "gptq", "rtn")


@dataclass
class QuantizedLinear:
    stored: dict[str, Tensor]  # tensor-name suffix ("planes", ... or "weight") -> what the artifact holds
    weight: Tensor  # fp32 [N, K]: exactly what loading `stored` gives, so calibration continues on it
    effective_bits: float  # every stored bit of the weight, scales included, per weight
    orders: dict[int, int]  # blocks per BCQ order (empty for uniform methods)


def packed(w: BCQWeight) -> QuantizedLinear:
    stored = {"planes": w.planes, "alpha_r": w.alpha_r, "alpha_c": w.alpha_c, "plane_ptr": w.plane_ptr}
    return QuantizedLinear(stored, dequantize(w, torch.float32), w.effective_bits,
                           dict(sorted(Counter(w.orders.tolist()).items())))


def dense(weight: Tensor, effective_bits: float) -> QuantizedLinear:
    """The uniform baselines are stored dequantized in fp16: their quality is compared, not their speed.
    Their bits are those of a packed uniform format: b per weight plus an fp16 scale and offset per group."""
    stored = weight.to(torch.float16)
    return QuantizedLinear({"weight": stored}, stored.float(), effective_bits, {})


@dataclass(frozen=True)
class Method:
    name: str = "quant-dllm"
    bits: int = 2
    block_size: int = 128
    abmp_ratio: float = 0.05
    naive_daq: bool = False
    iterations: int = 15
    percdamp: float = 0.01
    refine_rounds: int = 3

    @property
    def needs_calibration(self) -> bool:
        return self.name != "rtn"

    def quantize(self, W: Tensor, H: Tensor | None) -> QuantizedLinear:
        if self.name == "rtn":
            r = rtn(W, self.bits, self.block_size)
            return dense(r.weight, r.bits_per_weight)
        if self.name == "gptq":
            r = gptq(W, H, self.bits, self.block_size, self.block_size, self.percdamp)
            return dense(r.weight, r.bits_per_weight)
        r = quant_dllm(W, H, self.block_size, self.abmp_ratio, self.iterations, self.naive_daq, self.percdamp,
                       self.refine_rounds)
        return packed(pack([(c.signs, c.alpha_r, c.alpha_c) for c in r.codes]))
