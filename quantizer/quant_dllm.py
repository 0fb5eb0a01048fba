"""Quant-dLLM for one linear: ABMP orders, then DAQ (and its refinement) per block inside the GPTQ-style
block loop."""
from dataclasses import dataclass

import torch

from .abmp import abmp_orders
from .compensate import compensate
from .daq import BlockCode, daq_block
from .hessian import inverse_cholesky
from .refine import block_order, refine_block


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
               iters: int = 15, naive: bool = False, percdamp: float = 0.01,
               refine_rounds: int = 3) -> QuantDllmResult:
    """Quantize one linear W [N, K] with calibration second moment H [K, K] on H's device.

    The ABMP orders come from the original W and U, before any compensation. Each block is quantized
    by DAQ with its order in one go; its error is then pushed on as GPTQ's column loop would push it with
    Q_b fixed (as the released ARB-LLM/BiLLM code does): column i's error, after the updates from the
    block's earlier columns, is err_i = (w_i − q_i)/U_ii, which solves Err_b · U_bb = W_b − Q_b. The
    simpler (W_b − Q_b)/diag(U_bb) drops the within-block terms and loses accuracy on correlated inputs.
    Before that, `refine_rounds` rounds of the output-aware refinement (refine.py; 0 = the paper's DAQ
    alone) improve the block's code; with it, each block's columns are visited by decreasing diag(H).
    The naive-DAQ ablation skips the refinement too.
    """
    rounds = 0 if naive else refine_rounds
    perm = block_order(H, block_size) if rounds else torch.arange(H.shape[0], device=H.device)
    U, dead = inverse_cholesky(H[perm][:, perm], percdamp)
    W = W.to(U.device, torch.float32)[:, perm.to(U.device)]
    W[:, dead] = 0.0
    orders = abmp_orders(W, U.diagonal(), block_size, abmp_ratio)
    order_list = orders.tolist()

    def daq(b: int, Wb: torch.Tensor, Ubb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, BlockCode]:
        code, Qb = daq_block(Wb, Ubb.diagonal(), order_list[b], iters, naive)
        code, Qb, err = refine_block(Wb, Ubb, code, Qb, rounds)
        return Qb, err, code

    Q, codes = compensate(W, U, daq, block_size)
    back = torch.argsort(perm).to(U.device)
    local = back.reshape(-1, block_size) % block_size  # each block's columns back in their own order
    codes = [BlockCode(c.signs[:, :, i], c.alpha_r, c.alpha_c[:, i]) for c, i in zip(codes, local)]
    return QuantDllmResult(Q[:, back], codes, orders)
