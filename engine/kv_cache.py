"""A preallocated pool of K/V slots, one row of canvas positions per cached sequence.

One mechanism serves every cache policy: a forward writes the K/V of the tokens it is fed at their
positions, then attends either over the fed tokens (a full forward, which also refreshes the cache)
or over the first `read` positions of each row (a window forward: the block and its suffix for the
prefix cache, the block alone for the dual cache). Tokens that must not be stored (padding, and
rows of requests without a cache) go to one scratch position past the end of row 0, which no read
reaches, so a batch needs no per-row branches. (A whole scratch row would double the pool at batch 1.)
The pool grows only when a longer sequence arrives, never per step, and never past `max_length`. With a
memory budget (`positions_within`) the engine allocates it whole at start-up instead, so running out of
device memory shows then, not under load.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig

GROW = 128  # positions are allocated in multiples of this


def position_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one position of one sequence, over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def positions_within(budget: int, cfg: ModelConfig, slots: int, dtype: torch.dtype) -> int:
    """The longest row length whose pool (`slots` rows, each with one more position for the scratch) fits in
    `budget` bytes."""
    return max(0, budget // (slots * position_bytes(cfg, dtype)) - 1)


class KVPool:
    def __init__(self, cfg: ModelConfig, slots: int, length: int, device: torch.device | str, dtype: torch.dtype,
                 max_length: int | None = None):
        self.cfg, self.slots, self.device, self.dtype = cfg, slots, torch.device(device), dtype
        self.max_length = max_length
        self.k = self.v = torch.empty(0)
        self.length = 0
        self.reserve(length)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def scratch_slot(self) -> int:
        return 0

    @property
    def scratch_position(self) -> int:
        return self.length

    def reserve(self, length: int) -> None:
        """Make every row hold at least `length` positions, keeping what the rows already hold."""
        if length <= self.length:
            return
        new = -(-length // GROW) * GROW
        if self.max_length is not None:  # the engine refuses longer sequences
            new = min(new, self.max_length)
        shape = (self.cfg.n_layers, self.slots, new + 1, self.cfg.n_kv_heads, self.cfg.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v, self.length = k, v, new

    def view(self, write_slot: Tensor, write_position: Tensor, read_slot: Tensor | None = None,
             read: int = 0) -> CacheView:
        """The cache for one batched forward of [B, L] tokens.

        write_slot, write_position: [B, L] where each fed token's K/V goes (the scratch slot and
            position for tokens that must not be kept).
        read_slot: [B] the row each batch row attends over, the first `read` positions of it; None
            attends over the fed tokens themselves.
        """
        return CacheView(self, write_slot, write_position, read_slot, read)


class CacheView:
    """What the model's attention sees of the pool during one forward."""

    def __init__(self, pool: KVPool, write_slot: Tensor, write_position: Tensor, read_slot: Tensor | None,
                 read: int):
        self.pool, self.write_slot, self.write_position = pool, write_slot, write_position
        self.read_slot, self.read = read_slot, read

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v [B, L, H, D] (RoPE already applied); return the K/V to attend over."""
        self.pool.k[layer][self.write_slot, self.write_position] = k
        self.pool.v[layer][self.write_slot, self.write_position] = v
        if self.read_slot is None:
            return k, v
        return self.pool.k[layer][self.read_slot, : self.read], self.pool.v[layer][self.read_slot, : self.read]
