"""How many masked tokens each denoising step commits."""
from __future__ import annotations

import torch

DREAM_EPS = 1e-3  # Dream's final timestep


def split_steps(steps: int, n_blocks: int) -> list[int]:
    """Steps per block: LLaDA requires steps % n_blocks == 0; a remainder goes to the earliest blocks."""
    if steps < n_blocks:
        raise ValueError(f"SamplingParams.steps ({steps}) must be at least the number of blocks ({n_blocks})")
    return [steps // n_blocks + (b < steps % n_blocks) for b in range(n_blocks)]


def _ratio(step: int, steps: int) -> torch.Tensor:
    """Dream's 1 - s/t on linspace(1, eps, steps+1), in float32 as the reference computes it."""
    t = torch.linspace(1, DREAM_EPS, steps + 1)
    return 1 - t[step + 1] / t[step]


def commit_count(schedule: str, step: int, steps: int, n_start: int, n_remaining: int) -> int:
    """Tokens to commit at `step` of a block that had `n_start` masks and has `n_remaining` now."""
    if step == steps - 1:
        return n_remaining
    if schedule == "linear":  # LLaDA: base = n // s, and the first n % s steps take one more
        return n_start // steps + (step < n_start % steps)
    return int(torch.tensor(n_remaining, dtype=torch.float32) * _ratio(step, steps))


def commit_probability(schedule: str, step: int, steps: int, n_start: int, n_remaining: int) -> float:
    """Dream's `origin`: the chance that each masked token is committed at this step."""
    if step == steps - 1:
        return 1.0
    if schedule == "linear":
        return commit_count(schedule, step, steps, n_start, n_remaining) / max(n_remaining, 1)
    return float(_ratio(step, steps))
