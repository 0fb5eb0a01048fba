"""The asyncio front: streaming, cancellation, back-pressure, failures and shutdown."""
import asyncio

import pytest
from test_engine import REQUESTS, FailOnce, alone

from qdllm.engine import AsyncEngine, Detokenizer, EngineCore, EngineError, QueueFullError, SamplingParams, load_model

LONG = SamplingParams(max_tokens=64, steps=64, block_length=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model(llada_dir):
    return load_model(llada_dir)


def engine(model, **kw) -> AsyncEngine:
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=kw.pop("max_num_seqs", 4))
    return AsyncEngine(core, **kw)


def test_concurrent_streams_give_the_tokens_they_give_alone(model):
    async def collect(eng, prompt, params):
        return [out async for out in eng.submit(prompt, params)]

    async def main():
        eng = engine(model)
        try:
            return await asyncio.gather(*(collect(eng, p, s) for p, s in REQUESTS))
        finally:
            eng.shutdown()

    for (prompt, params), stream in zip(REQUESTS, asyncio.run(main())):
        final = stream[-1]
        assert final.finished and all(not o.finished for o in stream[:-1])
        assert final.token_ids == alone(model, prompt, params).token_ids
        assert sum((o.delta_token_ids for o in stream), []) == final.token_ids
        assert len(stream) == -(-params.max_tokens // min(params.block_length, params.max_tokens))


def test_cancel_frees_the_slot_for_the_next_request(model):
    async def main():
        eng = engine(model, max_num_seqs=1)
        try:
            stream = eng.submit([5, 6, 7], LONG)
            first = await stream.__anext__()
            assert not first.finished and len(first.token_ids) == 8
            stream.cancel()
            nxt = await eng.submit(*REQUESTS[0]).final()  # runs only once the cancelled one has left
            return nxt, eng.core.stats, eng.core.free_rows
        finally:
            eng.shutdown()

    nxt, stats, free = asyncio.run(main())
    assert nxt.token_ids == alone(model, *REQUESTS[0]).token_ids
    assert stats.aborted == 1 and stats.finished == 1 and free == 1


def test_a_full_queue_refuses_with_a_clear_error(model):
    async def main():
        eng = engine(model, max_num_seqs=1, max_queue=2)
        streams = []
        try:
            with pytest.raises(QueueFullError, match=r"queue is full \(2 requests waiting\); retry later"):
                for _ in range(4):  # one may already be running; the queue holds two more
                    streams.append(eng.submit([5, 6, 7], LONG))
            assert len(streams) in (2, 3) and eng.queue_depth == 2
            for s in streams:
                s.cancel()
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_bad_requests_raise_at_submit(model):
    async def main():
        eng = engine(model)
        try:
            with pytest.raises(ValueError, match="at least one token"):
                eng.submit([], SamplingParams())
            with pytest.raises(ValueError, match="already in flight"):
                eng.submit([5], LONG, request_id="a")
                eng.submit([5], LONG, request_id="a")
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(model, caplog):
    """The failure is logged with its traceback, so a server's operator sees what the clients were told."""
    async def main():
        core = EngineCore(FailOnce(model), Detokenizer(None, frozenset()), max_num_seqs=2)
        eng = AsyncEngine(core)
        try:
            with pytest.raises(EngineError, match="the engine failed: RuntimeError: CUDA out of memory"):
                await eng.submit(*REQUESTS[0]).final()
            return await eng.submit(*REQUESTS[0]).final()
        finally:
            eng.shutdown()

    assert asyncio.run(main()).token_ids == alone(model, *REQUESTS[0]).token_ids
    failed = [r for r in caplog.records if r.name == "qdllm.engine" and r.exc_info]
    assert len(failed) == 1 and "the requests in flight (1) fail with it" in failed[0].getMessage()
    assert "CUDA out of memory" in str(failed[0].exc_info[1])


def test_a_request_the_kv_pool_cannot_grow_to_fails_alone(model, device_room):
    """The device has room for ten pages; a long request holds nine, so a request of twelve finds no memory to
    grow the pool: its stream fails with the reason, and the long request finishes with its own tokens."""
    long = (list(range(3, 103)), SamplingParams(max_tokens=32, steps=8, block_length=8, cache="prefix"))
    huge = ([5] * 170, SamplingParams(max_tokens=16, block_length=8, cache="prefix"))

    async def main():
        eng = engine(model, max_num_seqs=2)
        try:
            running = eng.submit(*long)
            await running.__anext__()
            with pytest.raises(EngineError, match=r"^with a cache, prompt plus canvas keeps K/V for 186 positions; "
                                                  r"that exceeds the 144 positions that the KV pool held when the "
                                                  r"device ran out of memory as it grew \(0.000138 GiB\)$"):
                await eng.submit(*huge).final()
            return await running.final()
        finally:
            eng.shutdown()

    device_room(10)
    assert asyncio.run(main()).token_ids == alone(model, *long).token_ids


def test_shutdown_ends_streams_in_flight_and_refuses_new_ones(model):
    async def main():
        eng = engine(model, max_num_seqs=1)
        running, queued = eng.submit([5, 6, 7], LONG), eng.submit([8, 9], LONG)
        await running.__anext__()
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineError, match="shutting down"):
            eng.submit([5], LONG)
        return await running.final(), await queued.final()

    for out in asyncio.run(main()):
        assert out.finished and out.finish_reason == "abort"
