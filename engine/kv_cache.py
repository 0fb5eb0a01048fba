"""A paged pool of K/V positions, shared by every cached sequence.

The pool is one flat array of positions per layer, handed out in pages of PAGE positions. A cached request
gets pages for its whole length when it is admitted (a dLLM request's length, prompt plus canvas, is known
up front and never grows) and returns them when it ends, so short requests hold little and one long
request can use what the others leave free. A request sees its pages through a position index, [length]
flat positions, which the scheduler turns into per-forward index tensors.

One mechanism serves every cache policy: a forward writes the K/V of the tokens it is fed at their flat
positions, then attends either over the fed tokens (a full forward, which also refreshes the cache) or over
the K/V gathered from a read index (a window forward: each row's first `length` positions). Tokens that must
not be stored (padding, and rows of requests without a cache) go to one scratch position after the last
page, which reads reach only where attention masks them out, so a batch needs no per-row branches.

Without a budget the pool grows when an admission needs more pages than are free (by half at least, so
growth is rare, and never past `max_pages`). If the device has no memory for a larger pool, the pool keeps
its size and that size becomes its limit: the admission waits for running requests to end, as with a
budget, instead of failing the batch. With a memory budget (`pages_within`) the engine allocates it whole
at start-up instead, so running out of device memory shows then, not under load.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from .config import ModelConfig

PAGE = 16  # positions per page: the unit of allocation
log = logging.getLogger("qdllm.engine")


def position_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one position of one sequence, over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def pages_for(length: int) -> int:
    return -(-length // PAGE)


def pages_within(budget: int, cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The pages a pool of `budget` bytes holds, with its scratch position."""
    return max(0, (budget // position_bytes(cfg, dtype) - 1) // PAGE)


class KVPool:
    """K and V [n_layers, pages * PAGE + 1, n_kv_heads, head_dim]; the last position is the scratch."""

    def __init__(self, cfg: ModelConfig, pages: int, device: torch.device | str, dtype: torch.dtype,
                 max_pages: int | None = None):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.max_pages = max_pages  # None: fixed at `pages`
        self.out_of_memory = False  # a growth failed for lack of device memory, so max_pages is the size now
        self.k = self.v = torch.empty(0)
        self.pages = 0
        self.free: list[int] = []
        self._resize(pages)

    @property
    def capacity(self) -> int:
        """Positions in the pages (the scratch not counted)."""
        return self.pages * PAGE

    @property
    def scratch_position(self) -> int:
        return self.capacity

    @property
    def used_pages(self) -> int:
        return self.pages - len(self.free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def page_limit(self) -> int:
        """The most pages the pool may hold: its size, when it is fixed."""
        return self.pages if self.max_pages is None else self.max_pages

    def can_allocate(self, pages: int) -> bool:
        return self.used_pages + pages <= self.page_limit

    def reserve(self, pages: int) -> bool:
        """Make `pages` pages free, growing the pool if it must and may; False when it cannot. A growth that
        finds no device memory for the new size tries the bare need, and if that fails too the pool stops
        growing: its present size becomes its limit."""
        if not self.can_allocate(pages):
            return False
        need = self.used_pages + pages
        if need <= self.pages:
            return True
        for size in dict.fromkeys((min(self.page_limit, max(need, self.pages + self.pages // 2)), need)):
            try:
                self._resize(size)
                return True
            except torch.OutOfMemoryError:
                pass
        self.max_pages, self.out_of_memory = self.pages, True
        log.warning("KV pool: the device ran out of memory growing past %d positions; the pool keeps them "
                    "(%.3g GiB), and requests wait for its pages", self.capacity, self.nbytes / 2**30)
        return False

    def allocate(self, length: int, rows: int = 1) -> list[Tensor]:
        """Pages for `rows` sequence rows of `length` positions, growing the pool if it must: each row's flat
        positions [length] (int64, on the CPU)."""
        need = pages_for(length)
        if not self.reserve(rows * need):
            raise ValueError(f"the KV pool cannot hold {rows} x {length} more positions")
        offsets = torch.arange(PAGE)
        out = []
        for _ in range(rows):
            pages, self.free = torch.tensor(self.free[:need], dtype=torch.long), self.free[need:]
            out.append((pages[:, None] * PAGE + offsets).flatten()[:length])
        return out

    def release(self, positions: Tensor) -> None:
        """Return the pages behind `allocate`'s positions."""
        self.free.extend((positions[::PAGE] // PAGE).tolist())
        self.free.sort()  # lowest pages first: deterministic, and the pool's low end stays in use

    def _resize(self, pages: int) -> None:
        """Reallocate with `pages` pages, keeping what the old pages hold (new tensors: captured CUDA graphs that
        hold the old ones must be dropped)."""
        shape = (self.cfg.n_layers, pages * PAGE + 1, self.cfg.n_kv_heads, self.cfg.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.pages:
            k[:, : self.capacity] = self.k[:, : self.capacity]
            v[:, : self.capacity] = self.v[:, : self.capacity]
        self.free += list(range(self.pages, pages))
        self.k, self.v, self.pages = k, v, pages

    def view(self, write_index: Tensor, read_index: Tensor | None = None) -> CacheView:
        """The cache for one batched forward of [B, L] tokens.

        write_index: [B, L] the flat position each fed token's K/V goes to (the scratch position for tokens
            that must not be kept).
        read_index: [B, S] the flat positions each batch row attends over, in sequence order; None attends
            over the fed tokens themselves.
        """
        return CacheView(self, write_index, read_index)


class CacheView:
    """What the model's attention sees of the pool during one forward."""

    def __init__(self, pool: KVPool, write_index: Tensor, read_index: Tensor | None):
        self.pool, self.write_index, self.read_index = pool, write_index, read_index

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v [B, L, H, D] (RoPE already applied); return the K/V to attend over."""
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pk[self.write_index] = k
        pv[self.write_index] = v
        if self.read_index is None:
            return k, v
        # index_select gathers whole positions; indexing with a [B, S] tensor took 2x as long on a CPU
        shape, flat = (*self.read_index.shape, *pk.shape[1:]), self.read_index.flatten()
        return pk.index_select(0, flat).view(shape), pv.index_select(0, flat).view(shape)
