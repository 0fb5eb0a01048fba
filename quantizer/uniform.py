"""The uniform baselines for the comparison tables: RTN and GPTQ, b-bit asymmetric, per group of
columns. Both are stored dequantized (dense path); only their quality is compared."""
from dataclasses import dataclass

import torch

from .compensate import column_pass, compensate
from .hessian import inverse_cholesky


@dataclass
class UniformResult:
    weight: torch.Tensor    # dequantized W [N, K], fp32
    bits_per_weight: float  # b + (fp16 scale + fp16 offset) / group


def _group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset (the group minimum) and step over the last dim, keepdim, rounded to fp16 as stored.

    The offset is the zero point in value units (zero = −offset/step, fractional): it is stored as fp16
    anyway, and rounding it to an integer code would only lose accuracy.
    """
    lo = w.amin(-1, keepdim=True)
    step = (w.amax(-1, keepdim=True) - lo) / (2 ** bits - 1)
    lo, step = lo.half().float(), step.half().float()
    return lo, torch.where(step > 0, step, 1.0)  # a constant group: every code is 0, the level is lo


def _fake_quant(w: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The nearest of the 2^bits levels lo + q·step, q = 0 .. 2^bits − 1."""
    return lo + ((w - lo) / step).round().clamp(0, 2 ** bits - 1) * step


def _bits(bits: int, group_size: int) -> float:
    return bits + 32 / group_size


def rtn(W: torch.Tensor, bits: int = 2, group_size: int = 128) -> UniformResult:
    """Round to nearest, per row and group of `group_size` columns; no calibration."""
    n, k = W.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = W.float().reshape(n, k // group_size, group_size)
    lo, step = _group_params(w, bits)
    return UniformResult(_fake_quant(w, lo, step, bits).reshape(n, k), _bits(bits, group_size))


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 2, group_size: int = 128, block_size: int = 128,
         percdamp: float = 0.01) -> UniformResult:
    """GPTQ: columns quantized one at a time, each column's error pushed onto the rest of its block
    at once and onto the later blocks once per block. A group's offset and step are taken when its
    first column comes up, from the weights as compensated by then. Runs on H's device."""
    if block_size % group_size:
        raise ValueError(f"block size {block_size} is not a multiple of the group size {group_size}")
    U, dead = inverse_cholesky(H, percdamp)
    W = W.to(U.device, torch.float32, copy=True)
    W[:, dead] = 0.0

    def columns(b: int, Wb: torch.Tensor, Ubb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        params: list[torch.Tensor] = []

        def column(i: int, live: torch.Tensor) -> torch.Tensor:
            if i % group_size == 0:
                params[:] = _group_params(live[i:i + group_size].T, bits)
            lo, step = params
            return _fake_quant(live[i], lo[:, 0], step[:, 0], bits)

        return *column_pass(Wb, Ubb, column), None

    Q, _ = compensate(W, U, columns, block_size)
    return UniformResult(Q, _bits(bits, group_size))
