"""A bounded line of inference jobs: a few run at once in worker threads, a few wait, the rest are turned away.

MONAI Label 0.8.5 runs inference inside the event loop (one request froze every other, ``/info/`` too) and
lets any number wait. Here jobs run in worker threads, at most ``concurrency`` at a time, at most
``max_waiting`` more wait; a request beyond that gets 503 with a Retry-After at once, never a hang.
"""

from __future__ import annotations

import collections
import math
import threading
import time

import anyio


class QueueFull(Exception):
    """No room in the line; ``retry_after`` is the number of seconds a client should wait."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: retry after {retry_after} s")
        self.retry_after = retry_after


class InferQueue:
    """Admission and concurrency of inference jobs; ``admit()`` reserves a place before the upload is read."""

    def __init__(self, concurrency: int = 1, max_waiting: int = 8):
        self.concurrency = max(1, int(concurrency))
        self.max_waiting = max(0, int(max_waiting))
        self._limiter = anyio.CapacityLimiter(self.concurrency)
        self._admitted = 0
        self._lock = threading.Lock()
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    def admit(self) -> _Place:
        """A place in the line (release it when the request ends); QueueFull when the line is full."""
        with self._lock:
            if self._admitted >= self.concurrency + self.max_waiting:
                raise QueueFull(self.retry_after())
            self._admitted += 1
        return _Place(self)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean job time times the line ahead, per slot."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 10.0
        return max(1, math.ceil(mean * max(1, self._admitted) / self.concurrency))

    async def run(self, function, *args):
        """Run ``function(*args)`` in a worker thread once a slot is free (the event loop stays free)."""
        started = time.monotonic()
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)
        finally:
            self._durations.append(time.monotonic() - started)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1


class _Place:
    def __init__(self, queue: InferQueue):
        self._queue: InferQueue | None = queue

    def release(self) -> None:
        if self._queue is not None:
            self._queue._release()
            self._queue = None
