"""ABMP (Adaptive Blockwise Mixed Precision): 1, 2 or 3 binary planes per 128-column block, 2 on average."""
import math

import torch


def block_salience(W: torch.Tensor, d: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """s_b = Σ_{all rows, columns of block b} W²/d² [nb], with d = diag(U) [K].

    W²/d² is the OBS cost of losing a weight entirely, so s_b says how much the output suffers from
    coarse quantization of block b.
    """
    n, k = W.shape
    if k % block_size:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block_size}")
    return (W.float() / d).square().reshape(n, k // block_size, block_size).sum(dim=(0, 2))


def abmp_orders(W: torch.Tensor, d: torch.Tensor, block_size: int = 128, ratio: float = 0.05) -> torch.Tensor:
    """Order (planes) per block [nb], int64: the r least salient blocks get 1, the r most salient get 3,
    the rest 2, with r = min(⌊nb·ratio⌋, nb // 2); the mean is then exactly 2.

    Ties go by block index (a stable sort): among equal saliences the earlier block counts as lower.
    `ratio=0` gives order 2 everywhere (the "ABMP off" ablation).
    """
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(f"ABMP ratio must lie in [0, 0.5], got {ratio}")
    s = block_salience(W, d, block_size)
    nb = s.numel()
    r = min(math.floor(nb * ratio + 1e-9), nb // 2)  # the epsilon keeps e.g. 100 * 0.29 from flooring to 28
    orders = torch.full((nb,), 2, dtype=torch.long, device=s.device)
    if r:
        rank = torch.sort(s, stable=True).indices
        orders[rank[:r]] = 1
        orders[rank[nb - r:]] = 3
    return orders
