"""Requests that arrive together share one forward pass: an asyncio queue drained into batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Collects submitted items for up to `max_wait_s` after the first, at most `max_batch_size`, and runs them
    with `run` (items -> one result per item) in a thread of its own, so the event loop keeps accepting requests.

    While a batch runs, new items queue up and form the next batch at once: under load the batches fill without
    waiting. An exception from `run` fails every request of that batch, and the batcher goes on.
    """

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], max_batch_size: int = 8,
                 max_wait_s: float = 0.005):  # fmt: skip
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []  # every batch run so far, for /health and the tests
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finegrain-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: Item) -> Result:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.done()]  # clients that gave up
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
