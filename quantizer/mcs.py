"""MCS (Masked Calibration Simulation): calibration inputs shaped like the inputs of a denoising step.

A dLLM never sees a fully visible sequence while it generates: at every step part of the canvas is
the mask token. Calibrating on masked windows makes H describe the activations the model really meets.
"""
import math

import torch


def mcs_batch(windows: torch.Tensor, mask_id: int, prefix_ratio: float = 0.25, seed: int = 0,
              enabled: bool = True, first: int = 0, total: int | None = None) -> torch.Tensor:
    """Mask calibration windows [n, L]; global sample i gets timestep t_i = (i + 1) / total.

    The first ⌊prefix_ratio·L⌋ tokens stay visible (they play the prompt); every later token becomes
    `mask_id` with probability t_i. The draws come from a CPU generator seeded per sample, so a sample's
    mask depends neither on the device nor on how the windows are split into batches: a batch holding
    samples first .. first+n-1 of `total` (default: this batch is all of them) masks them exactly as the
    whole set would. `enabled=False` returns the windows untouched (the `--no-mcs` ablation).
    """
    if not enabled:
        return windows
    if windows.dim() != 2:
        raise ValueError(f"MCS: windows must be [n, L], got shape {tuple(windows.shape)}")
    if not 0.0 <= prefix_ratio <= 1.0:
        raise ValueError(f"MCS: prefix_ratio must lie in [0, 1], got {prefix_ratio}")
    n, length = windows.shape
    total = n if total is None else total
    if first < 0 or first + n > total:
        raise ValueError(f"MCS: samples {first}..{first + n - 1} do not fit in a set of {total}")
    keep = math.floor(prefix_ratio * length)
    masked = torch.zeros(n, length, dtype=torch.bool)
    for row in range(n):
        i = first + row
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        masked[row, keep:] = torch.rand(length - keep, generator=gen) < (i + 1) / total
    return windows.masked_fill(masked.to(windows.device), mask_id)
