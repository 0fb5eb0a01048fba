"""The asyncio front of the engine: one thread owns the device and steps the core; callers stream.

Handlers `submit` from the event loop and read block-level outputs from an async iterator. Requests
and cancellations cross to the engine thread through a locked inbox; outputs come back through
`call_soon_threadsafe`. The queue is bounded, so an overloaded engine refuses at once rather than
letting latency grow without limit.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from .output import RequestOutput, RequestStats
from .sampling import SamplingParams
from .scheduler import EngineCore, EngineStats

log = logging.getLogger("qdllm.engine")

class QueueFullError(RuntimeError):
    """The engine's queue is at its bound; the caller should retry later."""


class EngineError(RuntimeError):
    """The engine could not finish a request: it failed while running it, or it is shutting down."""


class RequestStream:
    """Async iterator over one request's outputs; the last has `finished` set."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self.done = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        out = await self.queue.get()
        if isinstance(out, Exception):
            self.done = True
            raise out
        self.done = out.finished
        return out

    async def final(self) -> RequestOutput:
        """Wait for the finished output."""
        out = None
        async for out in self:
            pass
        return out

    def cancel(self) -> None:
        """Stop the request (a no-op once it has finished); its slot frees at the engine's next step."""
        if not self.done:
            self.done = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, core: EngineCore, max_queue: int = 128):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.core, self.max_queue = core, max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, list[int], SamplingParams, RequestStats]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="qdllm-engine", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def alive(self) -> bool:
        """The engine thread runs and accepts requests."""
        return self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet running."""
        return len(self._inbox) + len(self.core.waiting)

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
               suffix: list[int] | None = None) -> RequestStream:
        """Queue a request from the event loop (with a `suffix`, an infill). Raises ValueError for a request the
        engine can never run, QueueFullError when the queue is at its bound, EngineError when shutting down."""
        self.core.check(prompt, params, suffix)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = RequestStream(self, request_id)
        with self._lock:
            if self._stopping:
                raise EngineError("the engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            if self.queue_depth >= self.max_queue:
                raise QueueFullError(f"the engine queue is full ({self.max_queue} requests waiting); retry later")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._inbox.append((request_id, list(prompt), params, RequestStats(), suffix))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, cancel those in flight (their streams end with finish_reason "abort"), and
        stop the engine thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for request_id, prompt, params, stats, suffix in inbox:
                self.core.add_request(prompt, params, request_id, stats, suffix)
            for request_id in aborts:
                self.core.abort_request(request_id)
            if stopping:
                for request_id in self.core.request_ids():
                    self.core.abort_request(request_id)
            if not self.core.has_unfinished():
                if stopping:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception as e:  # e.g. out of device memory: fail what was in flight, keep serving
                error = EngineError(f"the engine failed: {type(e).__name__}: {e}".splitlines()[0])
                failed = self.core.clear()
                log.exception("engine step failed; the requests in flight (%d) fail with it", len(failed))
                for request_id in failed:
                    self._deliver(request_id, error)
                continue
            for out in outputs:
                self._deliver(out.request_id, EngineError(out.error) if out.error else out)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        last = isinstance(item, Exception) or item.finished
        with self._lock:
            entry = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if entry is None:
            return
        loop, stream = entry
        try:
            loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed; nobody is listening
            pass
