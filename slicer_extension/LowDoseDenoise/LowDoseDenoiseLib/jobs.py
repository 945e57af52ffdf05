"""A request run in a background thread, polled from the GUI thread: no Slicer import, so it is tested in CI.

The Slicer module starts a ``BackgroundJob`` (for an upload: ``start_upload``) and polls it from a
``qt.QTimer``: the GUI never waits on the network, and every result, progress report and error is handed over
to the GUI thread by ``poll()``.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from .client import Cancelled, ConsentRequired, LowDoseClient, Progress, server_key


class BackgroundJob:
    """Run ``work(progress=..., cancel=...)`` in a daemon thread.

    ``poll()`` returns the progress reports that arrived since the last call; once the work has ended,
    ``done`` is true and ``result`` or ``error`` holds the outcome (``Cancelled`` after ``cancel()``).
    Call ``poll()`` from one thread only (the GUI's).
    """

    def __init__(self, work: Callable[..., Any], name: str = "lowdose-request"):
        self._work = work
        self._events: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> BackgroundJob:
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

    def poll(self) -> list[Progress]:
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

    def wait(
        self, timeout: float | None = None, interval: float = 0.05, between: Callable[[], None] | None = None
    ) -> bool:
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


def start_upload(
    client: LowDoseClient,
    export: Callable[[], tuple[str, str]],
    send: Callable[..., Any],
    name: str = "lowdose-request",
) -> BackgroundJob:
    """Send a volume in a started BackgroundJob: ``export()`` writes it (-> file path, temporary folder) only
    once the user has allowed this server, then ``send(client, path, progress=..., cancel=...)`` runs in the
    job, which removes the folder whatever happens. ConsentRequired, and nothing written, without permission.
    """
    if not client.upload_allowed:
        raise ConsentRequired(server_key(client.url))
    path, folder = export()

    def work(progress, cancel):
        try:
            return send(client, path, progress=progress, cancel=cancel)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return BackgroundJob(work, name=name).start()
