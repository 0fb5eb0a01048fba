"""The GPTQ-style block loop: quantize W one column block at a time and let the later columns absorb
each block's error, and Quant-dLLM's per-linear driver (ABMP orders + DAQ per block) built on it."""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .abmp import abmp_orders
from .daq import BlockCode, daq_block
from .hessian import inverse_cholesky

# (block index b, W_b [N, G] as compensated so far, U_bb [G, G]) -> (Q_b, Err_b, code).
# Err_b [N, G] is the block's error in U's coordinates; the callee must not modify W_b.
BlockQuantizer = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, object]]


def compensate(W: torch.Tensor, U: torch.Tensor, quantize_block: BlockQuantizer,
               block_size: int = 128) -> tuple[torch.Tensor, list]:
    """Quantize W [N, K] block by block (columns b·G:(b+1)·G, in order); returns (Q [N, K], codes).

    After block b the later columns absorb its error, W[:, later] −= Err_b · U[b, later], where
    U[b, later] holds the rows of U for the block's columns and the columns after it. This is the
    OBS update GPTQ applies to the next columns, taken once per block. W is not modified.
    """
    n, k = W.shape
    if k % block_size:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block_size}")
    W = W.to(U.device, torch.float32, copy=True)
    Q = torch.empty_like(W)
    codes = []
    for b, start in enumerate(range(0, k, block_size)):
        end = start + block_size
        Qb, err, code = quantize_block(b, W[:, start:end], U[start:end, start:end])
        Q[:, start:end] = Qb
        W[:, end:].sub_(err @ U[start:end, end:])
        codes.append(code)
    return Q, codes


@dataclass
class QuantDllmResult:
    """One linear quantized by Quant-dLLM."""
    weight: torch.Tensor   # Q [N, K] fp32: what the packed layer computes with
    codes: list[BlockCode]  # one per block, in column order
    orders: torch.Tensor   # int64 [nb], from ABMP

    @property
    def bits_per_weight(self) -> float:
        """Every stored bit per weight: one sign per weight and (N + G) fp16 scales per plane."""
        n, k = self.weight.shape
        g = k // len(self.codes)
        return int(self.orders.sum()) * (n * g + 16 * (n + g)) / (n * k)


def quant_dllm(W: torch.Tensor, H: torch.Tensor, block_size: int = 128, abmp_ratio: float = 0.05,
               iters: int = 15, naive: bool = False, percdamp: float = 0.01) -> QuantDllmResult:
    """Quantize one linear W [N, K] with calibration second moment H [K, K] on H's device.

    The ABMP orders come from the original W and U, before any compensation. Each block is quantized
    by DAQ with its order in one go; its error is then pushed on as GPTQ's column loop would push it with
    Q_b fixed (as the released ARB-LLM/BiLLM code does): column i's error, after the updates from the
    block's earlier columns, is err_i = (w_i − q_i)/U_ii, which solves Err_b · U_bb = W_b − Q_b. The
    simpler (W_b − Q_b)/diag(U_bb) drops the within-block terms and loses accuracy on correlated inputs.
    """
    U, dead = inverse_cholesky(H, percdamp)
    W = W.to(U.device, torch.float32, copy=True)
    W[:, dead] = 0.0
    orders = abmp_orders(W, U.diagonal(), block_size, abmp_ratio)
    order_list = orders.tolist()

    def daq(b: int, Wb: torch.Tensor, Ubb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, BlockCode]:
        d = Ubb.diagonal()
        code, Qb = daq_block(Wb, d, order_list[b], iters, naive)
        return Qb, torch.linalg.solve_triangular(Ubb, Wb - Qb, upper=True, left=False), code

    Q, codes = compensate(W, U, daq, block_size)
    return QuantDllmResult(Q, codes, orders)
