"""Preallocated K/V slots for every canvas position of a batch of sequences.

One mechanism serves every cache policy: a forward writes the K/V of the tokens it is fed at their
positions and attends over all slots. A full refresh feeds the whole canvas; the prefix cache then
feeds the block and its suffix; the dual cache feeds the block alone. The buffers are allocated
once, so steps cause no allocation churn.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, length: int, device: torch.device | str, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._rows = torch.arange(batch, device=device)[:, None]

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v [B, L, H, D] (RoPE already applied) at `positions` [B, L]; return all slots."""
        self.k[layer][self._rows, positions] = k
        self.v[layer][self._rows, positions] = v
        return self.k[layer], self.v[layer]
