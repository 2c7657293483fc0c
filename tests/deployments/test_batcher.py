"""The replica's dynamic batching: a lone request runs at once, requests that arrive during a call go together."""

from __future__ import annotations

import asyncio
import time

import pytest

from warmserve.deployments.batcher import Batcher, BatchTimes


class Engine:
    """Doubles numbers, taking ``seconds`` per call; records each call's items."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"cannot run {self.fail_on}")
        return [2 * x for x in items]


def test_a_lone_request_does_not_wait_for_a_batch() -> None:
    async def main() -> float:
        engine = Engine(seconds=0.0)
        batcher = Batcher(engine, max_batch_size=8, batch_wait_timeout_s=5.0)
        t0 = time.perf_counter()
        assert await batcher.submit(3) == 6
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 1.0  # a wait of the 5 s timeout would show


def test_requests_that_arrive_during_a_call_go_together_in_the_next() -> None:
    times: list[BatchTimes] = []

    async def main() -> tuple[list[int], Engine]:
        engine = Engine(seconds=0.05)
        batcher = Batcher(engine, max_batch_size=4, on_batch=lambda items, t: times.append(t))
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first call is running
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest), engine

    answers, engine = asyncio.run(main())
    assert answers == [0, 2, 4, 6, 8, 10, 12]
    assert engine.calls == [[0], [1, 2, 3, 4], [5, 6]]  # at most max_batch_size per call, in order
    assert [len(t.queued) for t in times] == [1, 4, 2]
    assert times[0].queued[0] < 0.01 and min(times[1].queued) > 0.03  # the second call's waited for the first


def test_a_batch_formed_under_load_waits_for_more_up_to_the_timeout() -> None:
    async def main() -> Engine:
        engine = Engine(seconds=0.05)
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.2)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.08)  # the first call is done; the second waits for company
        later = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.gather(first, second, *later)
        return engine

    assert asyncio.run(main()).calls == [[0], [1, 2, 3]]


def test_a_failed_call_fails_its_own_requests_only() -> None:
    async def main() -> list[object]:
        engine = Engine(seconds=0.05, fail_on=2)
        batcher = Batcher(engine, max_batch_size=2)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    answers = asyncio.run(main())
    assert answers[0] == 0 and answers[3] == 6
    assert all(isinstance(a, ValueError) and "cannot run 2" in str(a) for a in answers[1:3])


def test_a_cancelled_request_is_not_run() -> None:
    async def main() -> Engine:
        engine = Engine(seconds=0.05)
        batcher = Batcher(engine, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()  # its client went away
        assert await kept == 4 and await first == 0
        return engine

    assert asyncio.run(main()).calls == [[0], [2]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        Batcher(Engine(), max_batch_size=0)
