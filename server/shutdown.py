"""Stopping the server on SIGINT/SIGTERM without cutting a request off: requests in flight get time to
finish, then the engine ends the rest, so that every client still gets a well-formed 503."""
from __future__ import annotations

import asyncio
import socket
import time

import uvicorn

from qdllm.engine import AsyncEngine

# What uvicorn's own graceful timeout adds to the drain: it only fires if a handler ignores the engine's end
LAST_RESORT_S = 10.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the end of the requests in flight in the engine's hands.

    Left to uvicorn, a request still running at its graceful timeout has its task cancelled: the client gets a
    bare 500 or a cut stream, and the log a traceback per request. A second Ctrl+C skips even the lifespan
    shutdown, and the interpreter exits under the engine thread (SIGABRT). Here the requests get `drain_s`
    seconds, or until a second Ctrl+C; then the engine ends what is left (each handler answers its 503), and its
    thread has stopped before `run` returns.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_s: float):
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ending = asyncio.ensure_future(self._end_requests())
        await super().shutdown(sockets)  # waits for the connections, which `ending` brings to an end
        await ending
        if self.force_exit:  # uvicorn skipped the waits and the lifespan's end, which logs a traceback if left
            if self.server_state.tasks:  # the handlers answer at once now
                await asyncio.wait(set(self.server_state.tasks), timeout=LAST_RESORT_S)
            await self.lifespan.shutdown()

    async def _end_requests(self) -> None:
        deadline = time.monotonic() + self.drain_s
        while self.server_state.tasks and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(self.engine.shutdown)


def serve(app, engine: AsyncEngine, host: str, port: int, log_level: str, drain_s: float) -> None:
    """Run the app until SIGINT/SIGTERM; return once every request has had its answer and the engine stopped."""
    config = uvicorn.Config(app, host=host, port=port, loop="uvloop", log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_s + LAST_RESORT_S)
    DrainingServer(config, engine, drain_s).run()
