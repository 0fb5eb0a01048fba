"""CUDA graphs for the engine's forwards: each shape is captured once, then replayed.

Eager, a small forward is bound by kernel launches: on an H100, LLaDA-8B's fp16 forward of a 32-token block
took about 26 ms, against 5.4 ms to read its weights, because each layer launches dozens of small kernels
from Python. The engine's forwards repeat their shapes: a cached request's window forwards keep the same
rows, window and cache read length through a block, and its full forwards (the refresh at each block
start, or every step without a cache) keep its sequence length. So each shape is captured once and
replayed from then on.

Shapes are bucketed so that requests coming and going do not force new captures: rows are padded to a power
of two (at most max_num_seqs), full forwards to a multiple of LENGTH_STEP tokens, and the K/V positions a
window forward reads to a multiple of LENGTH_STEP too, so sequences of different lengths share graphs;
padding tokens are masked out of attention and store their K/V at the pool's scratch position, and padded
reads read the scratch position, masked out as well. Forwards of more than
`max_tokens` padded tokens stay eager: their compute dwarfs the launches, and their activations would stay
reserved in the graphs' memory pool. A graph reads its inputs from fixed tensors, and writes its logits to one
buffer that all graphs share: the logits a replay returns stay valid until the next replay.
"""
from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .kv_cache import KVPool
from .model import DiffusionLM

Capture = Callable[[Callable[[], Tensor]], tuple[Callable[[], None], Tensor]]
LENGTH_STEP = 64  # full forwards are padded to a multiple of this many tokens


def run_forward(model: DiffusionLM, pool: KVPool | None, full: bool, ids: Tensor, positions: Tensor,
                key_mask: Tensor, write_index: Tensor, read_index: Tensor, logits_at: Tensor) -> Tensor:
    """One batched forward as the engine runs it, eager or captured: with `pool`, the fed tokens' K/V are
    stored at write_index and attention reads the fed tokens (`full`) or the pool's K/V at read_index."""
    cache = None
    if pool is not None:
        cache = pool.view(write_index, None if full else read_index)
    return model(ids, positions=positions, key_mask=key_mask, cache=cache, logits_at=logits_at)


@functools.cache
def side_stream(device: int) -> torch.cuda.Stream:
    """The one stream that every warm-up and capture on `device` runs on, in the whole process. cuBLAS keeps a
    workspace per (handle, stream) until the process ends, 32 MiB each on Hopper: a new stream per capture
    held one more for every graph (0.30 GB over one LLaDA-8B request's nine shapes on the H100)."""
    return torch.cuda.Stream(device)


class CudaGraphCapture:
    """capture(fn) -> (replay, output): fn run once to warm up, then recorded, both on the `side_stream` of the
    model's device. That device is made current for the capture (Triton launches on the current device, whichever
    the tensors are on) and for each replay (which runs on the current device's stream).
    The live graphs share one memory pool, which is safe because replays never overlap (one engine thread, one
    stream). Once every graph of a pool is gone (all dropped when the KV pool grows), torch releases the pool,
    and its handle must not be captured into again: the next capture starts a new one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool, self.live = None, 0

    def _gone(self) -> None:
        self.live -= 1

    def __call__(self, fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        with torch.cuda.device(self.device):
            if self.live == 0:
                self.pool = torch.cuda.graph_pool_handle()
            stream = side_stream(torch.cuda.current_device())
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # outside the capture: Triton autotuning, the stream's cuBLAS workspace, other first-call work
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                out = fn()
        self.live += 1
        weakref.finalize(graph, self._gone)
        return functools.partial(self._replay, graph), out

    def _replay(self, graph: torch.cuda.CUDAGraph) -> None:
        with torch.cuda.device(self.device):  # on the current stream of the graph's device, after the input copies
            graph.replay()


class ForwardGraphs:
    """The captured forwards of one engine, least recently used first out beyond `max_graphs`."""

    def __init__(self, model: DiffusionLM, max_num_seqs: int, capture: Capture | None = None, max_graphs: int = 32,
                 max_tokens: int = 2048):
        self.model, self.max_num_seqs = model, max_num_seqs
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self.capture = capture if capture is not None else CudaGraphCapture(model.embed.weight.device)
        self.graphs: OrderedDict[tuple, tuple[Callable[[], None], list[Tensor], Tensor]] = OrderedDict()
        self.pool_k: Tensor | None = None
        self.logits: Tensor | None = None  # every graph's logits, flat (`_shared`)
        self.captures = 0

    def shape(self, batch: int, length: int, read: int, full: bool) -> tuple[int, int, int] | None:
        """The padded (rows, tokens per row, K/V positions read per row) of a forward of `batch` rows of `length`
        tokens that reads `read` positions (a full forward reads what it is fed), or None if it runs eagerly."""
        rows = 1
        while rows < batch:
            rows *= 2
        rows = min(rows, self.max_num_seqs)
        read = -(-read // LENGTH_STEP) * LENGTH_STEP
        if full:
            length = read
        return (rows, length, read) if rows * length <= self.max_tokens else None

    def forward(self, pool: KVPool | None, full: bool, ids: Tensor, positions: Tensor, key_mask: Tensor,
                write_index: Tensor, read_index: Tensor, logits_at: Tensor) -> Tensor:
        """`run_forward` on these inputs (padded to `shape`), from a replay."""
        if pool is not None and pool.k is not self.pool_k:  # the pool grew: graphs hold the old tensors
            self.graphs.clear()
            self.pool_k = pool.k
        inputs = [ids, positions, key_mask, write_index, read_index, logits_at]
        key = (full, pool is None, *ids.shape, key_mask.shape[1], logits_at.shape[1])
        if key in self.graphs:
            self.graphs.move_to_end(key)
            replay, static, out = self.graphs[key]
            for dst, src in zip(static, inputs):
                dst.copy_(src, non_blocking=True)
        else:
            static = [t.to(self.model.embed.weight.device, copy=True) for t in inputs]
            replay, out = self.capture(lambda: self._shared(run_forward(self.model, pool, full, *static)))
            self.graphs[key] = (replay, static, out)
            self.captures += 1
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        replay()
        return out

    def _shared(self, logits: Tensor) -> Tensor:
        """logits copied into the one buffer that every graph writes them to, as a view of their shape: a replay's
        logits are read before the next replay, so one buffer serves all graphs, where a graph's own would stay
        allocated as long as it lives (up to 32, each rows x n x vocab). The capture's warm-up call grows the
        buffer when needed, so the capture itself allocates nothing; graphs captured before a growth keep the old
        buffer alive through their view."""
        n = logits.numel()
        if self.logits is None or self.logits.numel() < n or self.logits.dtype != logits.dtype:
            self.logits = torch.empty(n, dtype=logits.dtype, device=logits.device)
        out = self.logits[:n].view(logits.shape)
        out.copy_(logits)
        return out
