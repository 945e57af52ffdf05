"""A request run in a background thread, polled from the GUI thread: no Slicer import, so it is tested in CI.

The Slicer module starts a ``BackgroundJob`` and polls it from a ``qt.QTimer``: the GUI never waits on the
network, and every result, progress report and error is handed over to the GUI thread by ``poll()``.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, List, Optional

from .client import Cancelled, Progress


class BackgroundJob:
    """Run ``work(progress=..., cancel=...)`` in a daemon thread.

    ``poll()`` returns the progress reports that arrived since the last call; once the work has ended,
    ``done`` is true and ``result`` or ``error`` holds the outcome (``Cancelled`` after ``cancel()``).
    Call ``poll()`` from one thread only (the GUI's).
    """

    def __init__(self, work: Callable[..., Any], name: str = "lowdose-request"):
        self._work = work
        self._events: "queue.Queue" = queue.Queue()
        self.cancel_event = threading.Event()
        self.done = False
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.started_at: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "BackgroundJob":
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def _run(self) -> None:
        try:
            outcome = ("result", self._work(progress=self._events.put, cancel=self.cancel_event))
        except BaseException as exc:  # handed to the GUI thread, which shows it
            outcome = ("error", exc)
        self._events.put(outcome)

    def poll(self) -> List[Progress]:
        reports = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                kind, value = item
                if kind == "result" and self.cancelled:
                    # Finished in the same instant as the cancel: the user asked to drop it.
                    kind, value = "error", Cancelled("cancelled")
                if kind == "result":
                    self.result = value
                else:
                    self.error = value
                self.done = True
            else:
                reports.append(item)
        return reports

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05,
             between: Optional[Callable[[], None]] = None) -> bool:
        """Poll until done (for scripts and tests); ``between`` runs after each poll (e.g. processEvents)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            self.poll()
            if between is not None:
                between()
            if self.done or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(interval)
        return self.done
