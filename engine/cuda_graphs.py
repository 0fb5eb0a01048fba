"""CUDA graphs for window forwards: each shape is captured once, then replayed step after step.

Eager, a forward is bound by kernel launches: on an H100, LLaDA-8B's fp16 forward of a 32-token block took
about 26 ms, against 5.4 ms to read its weights, because each layer launches dozens of small kernels from
Python. A cached request's window forward repeats the same shapes every step of a block (the same rows,
window and cache read length), so one capture serves them all. Full forwards (cache refreshes and
cache="none") stay eager: their length changes with the prompt, and their compute dwarfs the launches.

Batches are padded to a bucket of rows (powers of two, then max_num_seqs) so a request joining or leaving
does not force a new capture. A graph reads its inputs from, and writes its logits to, fixed tensors: the
logits a replay returns stay valid until the same graph replays again.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .kv_cache import KVPool
from .model import DiffusionLM

Capture = Callable[[Callable[[], Tensor]], tuple[Callable[[], None], Tensor]]


class CudaGraphCapture:
    """capture(fn) -> (replay, output): fn run once to warm up, then recorded. Every graph shares one memory
    pool, which is safe because replays never overlap (one engine thread, one stream)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # outside the capture: Triton autotuning, cuBLAS workspaces and other first-call work
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


class WindowGraphs:
    """The captured window forwards of one engine, least recently used first out beyond `max_graphs`."""

    def __init__(self, model: DiffusionLM, max_num_seqs: int, capture: Capture | None = None, max_graphs: int = 32):
        self.model, self.max_num_seqs, self.max_graphs = model, max_num_seqs, max_graphs
        self.capture = capture if capture is not None else CudaGraphCapture()
        self.graphs: OrderedDict[tuple, tuple[Callable[[], None], list[Tensor], Tensor]] = OrderedDict()
        self.pool_k: Tensor | None = None
        self.captures = 0

    def rows(self, batch: int) -> int:
        """The padded row count for a batch of `batch` rows."""
        bucket = 1
        while bucket < batch:
            bucket *= 2
        return min(bucket, self.max_num_seqs)

    def forward(self, pool: KVPool, ids: Tensor, positions: Tensor, key_mask: Tensor, write_slot: Tensor,
                write_position: Tensor, read_slot: Tensor, logits_at: Tensor) -> Tensor:
        """What `model(ids, positions, key_mask, pool.view(write_slot, write_position, read_slot, read),
        logits_at)` returns, with read = key_mask's width; rows already padded to `rows(batch)`."""
        if pool.k is not self.pool_k:  # the pool grew: every graph holds the old tensors
            self.graphs.clear()
            self.pool_k = pool.k
        inputs = [ids, positions, key_mask, write_slot, write_position, read_slot, logits_at]
        key = (*ids.shape, key_mask.shape[1], logits_at.shape[1])
        if key in self.graphs:
            self.graphs.move_to_end(key)
            replay, static, out = self.graphs[key]
            for dst, src in zip(static, inputs):
                dst.copy_(src)
        else:
            static = [t.to(ids.device, copy=True) for t in inputs]
            s_ids, s_pos, s_mask, s_ws, s_wp, s_rs, s_at = static
            read = key_mask.shape[1]
            replay, out = self.capture(lambda: self.model(
                s_ids, positions=s_pos, key_mask=s_mask, cache=pool.view(s_ws, s_wp, s_rs, read), logits_at=s_at))
            self.graphs[key] = (replay, static, out)
            self.captures += 1
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        replay()
        return out
