"""DAQ (Data-aware Any-order Quantizer): one block W_b [N, G] ≈ Σ_k (α_r[k] ⊗ α_c[k]) ⊙ B_k, B_k ∈ {±1}.

The planes start from a greedy residual binarisation and are then refined by alternating weighted
least squares on the scales and an exact joint sign search, where the weights single out the elements
whose loss costs the layer output most (salience W²/diag(U)²).
"""
from dataclasses import dataclass

import torch


@dataclass
class BlockCode:
    """One block's binary planes: Ŵ_b = Σ_k (alpha_r[k] ⊗ alpha_c[k]) ⊙ (signs[k] ? +1 : −1).

    The scales are fp32 holding fp16-exact values, so packing them as fp16 loses nothing.
    """
    signs: torch.Tensor    # bool [o, N, G], True = +1
    alpha_r: torch.Tensor  # fp32 [o, N]
    alpha_c: torch.Tensor  # fp32 [o, G]

    @property
    def order(self) -> int:
        return self.signs.shape[0]


def salience_weights(W: torch.Tensor, d: torch.Tensor, z_thresh: float = 2.0, lam: float = 3.0) -> torch.Tensor:
    """Error weights M [N, G]: λ where the z-score of W²/d² over the block exceeds z_thresh, else 1."""
    sens = (W / d).square()
    outlier = (sens - sens.mean()).abs() > z_thresh * sens.std()
    return outlier.float().mul_(lam - 1.0).add_(1.0)


def weighted_error(W: torch.Tensor, Q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The DAQ objective Σ M ⊙ (W − Q)², summed in float64."""
    return (M * (W - Q).square()).sum(dtype=torch.float64)


def reconstruct(alpha_r: torch.Tensor, alpha_c: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σ_k (alpha_r[k] ⊗ alpha_c[k]) ⊙ B[k] for ±1 signs B [o, N, G]."""
    return (alpha_r[:, :, None] * alpha_c[:, None, :] * B).sum(0)


def sign_patterns(order: int, device: torch.device) -> torch.Tensor:
    """All 2^order sign patterns, [2^order, order] of ±1; pattern 0 is all +1, then binary counting."""
    bits = (torch.arange(2 ** order, device=device)[:, None] >> torch.arange(order, device=device)) & 1
    return 1.0 - 2.0 * bits.float()


def level_table(alpha_r: torch.Tensor, alpha_c: torch.Tensor) -> torch.Tensor:
    """Every value an element can take, [G, N, 2^o]: level p of element (n, g) is
    Σ_k pattern[p, k] α_r[k, n] α_c[k, g]. Column-major with the patterns last, so that one column's
    levels are contiguous and the argmin runs over the last dim (over a leading dim, torch's CPU argmin
    is about ten times slower, and it dominated a conversion)."""
    patterns = sign_patterns(alpha_r.shape[0], alpha_r.device)
    scale = alpha_c[:, :, None] * alpha_r[:, None, :]               # [o, G, N]
    o, g, n = scale.shape
    return (scale.reshape(o, g * n).T @ patterns.T).reshape(g, n, -1)


def update_signs(W: torch.Tensor, alpha_r: torch.Tensor, alpha_c: torch.Tensor) -> torch.Tensor:
    """Signs [o, N, G] (±1): per element the pattern s ∈ {±1}^o minimising |W − Σ_k s_k α_r[k] α_c[k]|.

    Exhaustive over the 2^o patterns. The objective is separable per element and a positive weight
    does not move an element's minimiser, so this is the exact joint optimum for any M. Ties go to the
    pattern with the most leading +1 signs.
    """
    patterns = sign_patterns(alpha_r.shape[0], W.device)
    best = (W.T.contiguous()[:, :, None] - level_table(alpha_r, alpha_c)).abs().argmin(-1)  # [G, N]
    return patterns[best].permute(2, 1, 0).contiguous()


def _wls_scale(T: torch.Tensor, B: torch.Tensor, M: torch.Tensor, other: torch.Tensor, dim: int,
               old: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares scale s for T ≈ s ⊗ other ⊙ B, one s per slice along `dim` (summed
    over it); keeps the old value where the denominator Σ M·other² vanishes."""
    num = (M * T * B * other).sum(dim)
    den = (M * other.square()).sum(dim)
    return torch.where(den > 0, num / den, old)


def daq_block(W: torch.Tensor, d: torch.Tensor, order: int, iters: int = 15, naive: bool = False,
              z_thresh: float = 2.0, lam: float = 3.0,
              history: list[float] | None = None) -> tuple[BlockCode, torch.Tensor]:
    """Quantize one block W [N, G] (already compensated) to `order` planes; d = diag(U) of its columns.

    Returns the codes and the reconstruction Q [N, G] (fp32) computed from the fp16-rounded scales, so
    the compensation sees the error of what is stored. `naive=True` is the naive-DAQ ablation: unit
    weights and no refinement (the greedy residual initialisation only). If `history` is given, the
    weighted objective after the initialisation and after each iteration is appended to it (it never
    increases; measured on the fp32 scales).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DAQ order must be 1, 2 or 3, got {order}")
    W = W.float()
    M = torch.ones_like(W) if naive else salience_weights(W, d, z_thresh, lam)

    # Greedy residual initialisation: binarise what the previous planes left over.
    alpha_r = W.new_empty(order, W.shape[0])
    alpha_c = W.new_empty(order, W.shape[1])
    B = torch.empty(order, *W.shape, dtype=W.dtype, device=W.device)
    R = W.clone()
    for k in range(order):
        absR = R.abs()
        a = absR.mean(1)
        live = a > 0
        ratio = torch.where(live[:, None], absR / a[:, None], 0.0)
        alpha_r[k], alpha_c[k] = a, ratio.sum(0) / live.sum().clamp_min(1)
        B[k] = torch.where(R >= 0, 1.0, -1.0)
        R -= alpha_r[k, :, None] * alpha_c[k] * B[k]
    if history is not None:
        history.append(weighted_error(W, reconstruct(alpha_r, alpha_c, B), M).item())

    for _ in range(0 if naive else iters):
        for k in range(order):
            Qk = alpha_r[k, :, None] * alpha_c[k] * B[k]
            T = W - (reconstruct(alpha_r, alpha_c, B) - Qk)
            alpha_r[k] = _wls_scale(T, B[k], M, alpha_c[k][None, :], 1, alpha_r[k])
            alpha_c[k] = _wls_scale(T, B[k], M, alpha_r[k][:, None], 0, alpha_c[k])
        if order > 1:  # an order-1 block keeps B = sign(W)
            B = update_signs(W, alpha_r, alpha_c)
        if history is not None:
            history.append(weighted_error(W, reconstruct(alpha_r, alpha_c, B), M).item())

    alpha_r, alpha_c = alpha_r.half().float(), alpha_c.half().float()
    return BlockCode(B > 0, alpha_r, alpha_c), reconstruct(alpha_r, alpha_c, B)
