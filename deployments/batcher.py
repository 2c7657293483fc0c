"""Dynamic batching that never holds a lone request back.

Serve's ``@serve.batch`` waits ``batch_wait_timeout_s`` for more requests even when nothing else is queued, so
one client pays that wait on every request. Here a request that finds the replica idle runs at once; requests
that arrive while an engine call runs wait for it, and go together in the next call (up to ``max_batch_size``).
Only such a batch, one formed under load, may wait up to ``batch_wait_timeout_s`` more to fill up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    since: float = field(default_factory=time.perf_counter)


@dataclass
class BatchTimes:
    """What one engine call's requests spent: waiting in the queue (seconds, one per request) and in the call."""

    queued: list[float]
    run: float


class Batcher(Generic[T, R]):
    """Gathers concurrent ``submit`` calls into calls of ``run`` (a list of items -> one result per item, in
    order) on the event loop it is used from; one call runs at a time. ``on_batch`` hears each call's items and
    times."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        on_batch: Callable[[list[T], BatchTimes], None] | None = None,
    ) -> None:
        self.run = run
        self.on_batch = on_batch
        self.configure(max_batch_size, batch_wait_timeout_s)
        self._queue: deque[_Waiting[T, R]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._more = asyncio.Event()

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(
                f"max_batch_size >= 1 and batch_wait_timeout_s >= 0, got {max_batch_size}, {batch_wait_timeout_s}"
            )
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s

    @property
    def busy(self) -> bool:
        return self._drainer is not None and not self._drainer.done()

    async def submit(self, item: T) -> R:
        waiting: _Waiting[T, R] = _Waiting(item, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._more.set()
        if not self.busy:
            self._drainer = asyncio.create_task(self._drain())
        return await waiting.future

    async def _drain(self) -> None:
        loaded = False  # this call's requests came while another call ran
        while self._queue:
            if loaded and self.batch_wait_timeout_s > 0:
                await self._fill(time.perf_counter() + self.batch_wait_timeout_s)
            batch = self._take()
            if batch:
                await self._call(batch)
            loaded = True

    async def _fill(self, deadline: float) -> None:
        """Wait for the queue to hold a full batch, until ``deadline``."""
        while self._live() < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
            self._more.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), left)

    def _live(self) -> int:
        return sum(not w.future.done() for w in self._queue)

    def _take(self) -> list[_Waiting[T, R]]:
        batch: list[_Waiting[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            waiting = self._queue.popleft()
            if not waiting.future.done():  # its client went away (cancelled): nothing to run for it
                batch.append(waiting)
        return batch

    async def _call(self, batch: list[_Waiting[T, R]]) -> None:
        start = time.perf_counter()
        try:
            results = await self.run([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} requests got {len(results)} results")
        except BaseException as e:  # every request of the call hears it; the next call runs anyway
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e if isinstance(e, Exception) else RuntimeError("the replica stopped"))
            if not isinstance(e, Exception):
                raise
            return
        finally:
            if self.on_batch is not None:
                times = BatchTimes([start - w.since for w in batch], time.perf_counter() - start)
                self.on_batch([w.item for w in batch], times)
        for w, result in zip(batch, results, strict=True):
            if not w.future.done():
                w.future.set_result(result)
