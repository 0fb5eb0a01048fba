"""The layer-input second moment H = (2/n) Σ x xᵀ and the inverse-Hessian Cholesky factor U used by
ABMP, DAQ and the GPTQ-style compensation."""
import math
import warnings

import torch


class HessianAccumulator:
    """H = (2/n) Σ x xᵀ over every calibration token added so far, in fp32.

    Kept as a running average (rescaled at each add) rather than a raw sum, so its magnitude does not
    grow with the token count and fp32 keeps its precision over long calibration runs. The inputs may
    live elsewhere (the CPU); each chunk is moved to H's device.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a chunk of layer inputs [..., K]; every leading index is one token."""
        x = x.reshape(-1, self.H.shape[0]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.T, x)


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01,
                     retries: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """U, the upper Cholesky factor of (H + damp·I)⁻¹ (so H⁻¹ ≈ UᵀU), and the dead-column mask [K].

    damp = percdamp·mean(diag H). Dead columns (diag H == 0: the input feature was zero on every
    calibration token) get H[i, i] = 1 so H stays invertible; the caller must zero W[:, dead], whose
    values the calibration cannot judge. If round-off leaves the dampened H not positive definite, the
    damping grows tenfold per retry (with a warning); after `retries` more tries it raises ValueError.
    H itself is not modified.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H has non-finite entries: its calibration inputs hold NaN or inf (overflowing activations)")
    H = H.to(torch.float32, copy=True)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = diag.mean().item()
    rel = percdamp
    for attempt in range(retries + 1):
        if attempt:
            rel = max(rel * 10, 1e-3)
            warnings.warn(f"H is not positive definite; retrying with damping {rel:g}·mean(diag H)")
        damped = H.clone()
        damped.diagonal().add_(rel * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0:
                return U, dead
    raise ValueError(f"H is not positive definite even with damping {rel:g}·mean(diag H) "
                     f"(mean diag {mean_diag:g}); the calibration activations are degenerate")
