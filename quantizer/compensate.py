"""The GPTQ-style loops: quantize W one column block at a time and let the later columns absorb each
block's error (`compensate`), and, inside a block, one column at a time (`column_pass`)."""
from collections.abc import Callable

import torch

# (block index b, W_b [N, G] as compensated so far, U_bb [G, G]) -> (Q_b, Err_b, code).
# Err_b [N, G] is the block's error in U's coordinates; the callee must not modify W_b.
BlockQuantizer = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, object]]
# (column i, the block as updated so far, transposed [G, N]) -> column i quantized [N].
ColumnQuantizer = Callable[[int, torch.Tensor], torch.Tensor]


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


def column_pass(Wb: torch.Tensor, Ubb: torch.Tensor, quantize_column: ColumnQuantizer
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's loop inside one block: quantize column i only after the errors of the block's earlier
    columns were pushed onto it. Returns (Q_b, Err_b); Err_b in U's coordinates, as `compensate` wants.
    W_b is not modified. The loop works on W_bᵀ, where a column is a contiguous row: the same arithmetic,
    about four times faster on a CPU than strided columns."""
    live = Wb.T.contiguous()
    Q, err = torch.empty_like(live), torch.empty_like(live)
    for i in range(live.shape[0]):
        Q[i] = quantize_column(i, live)
        err[i] = (live[i] - Q[i]) / Ubb[i, i]
        live[i + 1:] -= Ubb[i, i + 1:, None] * err[i]
    return Q.T.contiguous(), err.T.contiguous()
