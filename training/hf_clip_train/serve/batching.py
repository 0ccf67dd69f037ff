"""Dynamic batching: requests from many clients grouped into one forward on one worker thread that owns the model."""

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BatchingSettings:
    """A batch closes when it holds `max_batch_size` inputs, or `max_wait_ms` after its first input arrived."""

    max_batch_size: int = 32
    max_wait_ms: float = 2.0

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"--max_batch_size must be at least 1, got {self.max_batch_size}.")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must be 0 or more, got {self.max_wait_ms}.")


@dataclass
class _Job:
    """One input of one request, waiting for its embedding."""

    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStatistics:
    """What the worker has run: forwards and inputs per kind (`inputs / batches` is the mean batch size)."""

    batches: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    largest: int = 0

    def record(self, kind: str, size: int) -> None:
        self.batches[kind] = self.batches.get(kind, 0) + 1
        self.inputs[kind] = self.inputs.get(kind, 0) + size
        self.largest = max(self.largest, size)


class DynamicBatcher:
    """One worker thread that runs `forward(kind, items) -> (len(items), d)` on batches of queued inputs.

    Each kind ("text", "image") has its own queue and its batches hold one kind only; the kind whose oldest input has
    waited longest goes first. An input whose request was cancelled (the client went away) before its batch formed is
    dropped, so it costs the others nothing; the wait for a batch to fill is bounded by `max_wait_ms` from its first
    input, so a slow client (whose input arrives late) joins a later batch rather than holding one open.

        batcher = DynamicBatcher(forward, BatchingSettings(32, 2.0), kinds=("text", "image"))
        batcher.start()
        embeddings = await batcher.submit("text", ["a red circle", "a blue square"])   # (2, d)
        batcher.stop()   # after the last request: finishes what is queued, then ends the thread
    """

    def __init__(self, forward: Callable[[str, list[Any]], torch.Tensor], settings: BatchingSettings,
                 kinds: Sequence[str] = ("text", "image")):
        self.forward, self.settings = forward, settings
        self.queues: dict[str, deque[_Job]] = {kind: deque() for kind in kinds}
        self.statistics = BatchStatistics()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="hf-clip-serve-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Run what is still queued, then end the worker thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def waiting(self) -> dict[str, int]:
        """Inputs queued per kind, not yet in a forward."""
        with self._condition:
            return {kind: sum(not job.future.done() for job in queue) for kind, queue in self.queues.items()}

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    async def submit(self, kind: str, items: Sequence[Any]) -> torch.Tensor:
        """The embeddings (len(items), d) of `items`, computed in the batches they join (queued until `start`)."""
        if self._stopping:
            raise RuntimeError("The batching worker is stopping (so is the server).")
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, loop.create_future(), loop) for item in items]
        with self._condition:
            self.queues[kind].extend(jobs)
            self._condition.notify_all()
        try:
            rows = await asyncio.gather(*(job.future for job in jobs))
        except asyncio.CancelledError:
            for job in jobs:
                job.future.cancel()
            raise
        return torch.stack(rows)

    def _next_batch(self) -> tuple[str, list[_Job]] | None:
        """Wait for queued inputs, choose the kind waiting longest, fill its batch; None once stopped and empty.
        Called with the condition held."""
        while True:
            for queue in self.queues.values():
                while queue and queue[0].future.done():
                    queue.popleft()
            waiting = [kind for kind, queue in self.queues.items() if queue]
            if waiting:
                break
            if self._stopping:
                return None
            self._condition.wait()
        kind = min(waiting, key=lambda name: self.queues[name][0].enqueued_at)
        queue = self.queues[kind]
        deadline = queue[0].enqueued_at + self.settings.max_wait_ms / 1000
        while len(queue) < self.settings.max_batch_size and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._condition.wait(left)
        batch = []
        while queue and len(batch) < self.settings.max_batch_size:
            job = queue.popleft()
            if not job.future.done():
                batch.append(job)
        return kind, batch

    def _work(self) -> None:
        while True:
            with self._condition:
                next_batch = self._next_batch()
            if next_batch is None:
                return
            kind, batch = next_batch
            if not batch:
                continue
            try:
                embeddings = self.forward(kind, [job.item for job in batch])
            except Exception as error:  # the requests of this batch fail; the worker keeps serving
                for job in batch:
                    job.loop.call_soon_threadsafe(_settle, job.future, None, error)
                continue
            self.statistics.record(kind, len(batch))
            for job, row in zip(batch, embeddings):
                job.loop.call_soon_threadsafe(_settle, job.future, row, None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
