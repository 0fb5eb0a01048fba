"""Output-aware refinement of a DAQ block: a qdllm addition to the paper's DAQ (`--refine-rounds`).

DAQ fits a whole block at once to an elementwise, salience-weighted error. What the layer loses is
the output error: with the later blocks compensated, block b costs ‖(W_b − Q_b)·U_bb⁻¹‖², which
couples the block's columns through the calibration data. Starting from DAQ's planes, the refinement
alternates two steps on that loss:
- signs in GPTQ's column order: each column takes, per row, the nearest of its 2^o levels after the
  errors of the block's earlier columns were pushed onto it (what GPTQ does with a uniform grid);
- scales: alpha_r, then alpha_c, of each plane by exact least squares under S = (U_bbᵀ U_bb)⁻¹.
It returns the best code it met, DAQ's own included, so it never does worse than DAQ on the block.
The sign pass visits a block's columns by decreasing diag(H) (`block_order`), as GPTQ's act-order does,
but only within blocks: the blocks, and so the packed format, do not change.
"""
import torch

from .compensate import column_pass
from .daq import BlockCode, level_table, reconstruct, sign_patterns


def block_order(H: torch.Tensor, block_size: int) -> torch.Tensor:
    """A permutation of H's columns that sorts each block by decreasing diag(H) (ties by index)."""
    d = H.diagonal()
    return torch.cat([start + torch.argsort(d[start:start + block_size], descending=True, stable=True)
                      for start in range(0, d.shape[0], block_size)])


def block_error(Wb: torch.Tensor, Qb: torch.Tensor, Ubb: torch.Tensor) -> torch.Tensor:
    """Err_b with Err_b · U_bb = W_b − Q_b: the block's error in U's coordinates; ‖Err_b‖² is its loss."""
    return torch.linalg.solve_triangular(Ubb, Wb - Qb, upper=True, left=False)


def assign_signs(Wb: torch.Tensor, Ubb: torch.Tensor, alpha_r: torch.Tensor, alpha_c: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signs [o, N, G] (±1) chosen column by column with GPTQ's feedback; returns (signs, Q_b, Err_b)."""
    patterns = sign_patterns(alpha_r.shape[0], Wb.device)  # [2^o, o]
    table = level_table(alpha_r, alpha_c)                  # [G, N, 2^o]
    signs = torch.empty(alpha_r.shape[0], *Wb.shape, dtype=Wb.dtype, device=Wb.device)

    def column(i: int, live: torch.Tensor) -> torch.Tensor:
        best = (live[i, :, None] - table[i]).abs().argmin(-1)
        signs[:, :, i] = patterns[best].T
        return table[i].gather(1, best[:, None])[:, 0]

    return signs, *column_pass(Wb, Ubb, column)


def refit_scales(Wb: torch.Tensor, S: torch.Tensor, signs: torch.Tensor, alpha_r: torch.Tensor,
                 alpha_c: torch.Tensor, sweeps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise tr((W_b − Q_b) S (W_b − Q_b)ᵀ) over the scales, signs fixed: per plane, each row scale
    in closed form, then the column scales by one G×G solve. Each step is exact, so the loss never
    rises; a step whose system is singular keeps the old scales."""
    alpha_r, alpha_c = alpha_r.clone(), alpha_c.clone()
    for _ in range(sweeps):
        for k in range(signs.shape[0]):
            T = Wb - (reconstruct(alpha_r, alpha_c, signs) - alpha_r[k, :, None] * alpha_c[k] * signs[k])
            C = alpha_c[k] * signs[k]              # plane k with unit row scales
            CS = C @ S
            den = (CS * C).sum(1)
            alpha_r[k] = torch.where(den > 0, (CS * T).sum(1) / den, alpha_r[k])
            R = alpha_r[k, :, None] * signs[k]     # plane k with unit column scales
            A = S * (R.T @ R)                      # PSD (Schur product), PD unless a column is dead
            L, info = torch.linalg.cholesky_ex(A)
            if info.item() == 0:
                rhs = (R * (T @ S)).sum(0)
                alpha_c[k] = torch.cholesky_solve(rhs[:, None], L)[:, 0]
    return alpha_r, alpha_c


def refine_block(Wb: torch.Tensor, Ubb: torch.Tensor, code: BlockCode, Qb: torch.Tensor, rounds: int
                 ) -> tuple[BlockCode, torch.Tensor, torch.Tensor]:
    """Refine DAQ's code of block W_b [N, G] for `rounds` scale refits (a sign pass before each and one
    after the last); returns the best (code, Q_b, Err_b). Scales are rounded to fp16 after each refit,
    so every candidate is exactly what would be stored."""
    err = block_error(Wb, Qb, Ubb)
    best = (err.square().sum().item(), code, Qb, err)
    if rounds == 0:
        return best[1:]
    eye = torch.eye(Wb.shape[1], dtype=Wb.dtype, device=Wb.device)
    Uinv = torch.linalg.solve_triangular(Ubb, eye, upper=True)
    S = Uinv @ Uinv.T
    alpha_r, alpha_c = code.alpha_r, code.alpha_c
    for r in range(rounds + 1):
        signs, Q, err = assign_signs(Wb, Ubb, alpha_r, alpha_c)
        loss = err.square().sum().item()
        if loss < best[0]:
            best = (loss, BlockCode(signs > 0, alpha_r, alpha_c), Q, err)
        if r == rounds:
            break
        alpha_r, alpha_c = (a.half().float() for a in refit_scales(Wb, S, signs, alpha_r, alpha_c))
        if not (alpha_r.isfinite().all() and alpha_c.isfinite().all()):
            break  # beyond fp16's range: keep the best so far
    return best[1:]
